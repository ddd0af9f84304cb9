"""AVEB metrics against hand-computed values (appendix B rules), the judge against a local stub server."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from training.eval import metrics as M
from training.eval.judge import Judge, JudgeConfig, judge_prompt, parse_verdict
from training.eval.runner import format_table, score_predictions, score_task


def test_normalise_and_word_containment():
    assert M.normalise("  The Red-Circle, appears!  ") == "the red circle appears"
    assert M.contains_words("A red circle appears", "red circle")
    assert not M.contains_words("A red circles appears", "red circle")  # whole words only
    assert not M.contains_words("circle red", "red circle")  # order matters
    assert not M.contains_words("anything", "  ...  ")  # empty reference never matches


@pytest.mark.parametrize("answer, reference, expected", [
    ("Yes.", "yes", True),
    ("Yes, the audio matches.", "yes", True),
    ("yes or no", "yes", False),  # opposite answer present -> wrong
    ("No, not yes.", "no", False),
    ("I know", "no", False),  # 'know' is not the word 'no'
    ("nobody", "no", False),
    ("It is a red circle.", "red circle", True),
    ("It is red.", "red circle", False),
    ("no", "blue", False),
])
def test_qa_rule_with_opposite_answer_check(answer, reference, expected):
    assert M.qa_correct(answer, reference) is expected


def test_exact_match_is_whole_answer():
    assert M.exact_match("Playing the guitar.", "playing the guitar")
    assert not M.exact_match("He is playing the guitar", "playing the guitar")
    assert not M.exact_match("", "")


def test_ocr_one_third_per_hit():
    refs = ["stop", "stop", "stop sign", "halt", "stop", "stop", "stop", "stop", "stop", "stop"]
    # 'stop' appears in 'the sign says stop' -> 8 hits of 'stop' -> capped at 1
    assert M.ocr_score("the sign says stop", refs) == 1.0
    # only 'halt' is found: 1 hit -> 1/3
    assert M.ocr_score("halt", refs) == pytest.approx(1 / 3)
    # two references found: 'stop sign' once and 'stop' ... here only those two strings exist
    assert M.ocr_score("a stop sign", ["stop sign", "stop", "go"]) == pytest.approx(2 / 3)
    assert M.ocr_score("nothing", refs) == 0.0


def test_wer_hand_computed():
    # ref 'the cat sat' (3 words) vs 'the cat sat down' -> 1 insertion; ref 'a dog' vs 'a log' -> 1 sub.
    # corpus WER = (1 + 1) / (3 + 2) = 0.4
    assert M.wer(["The cat sat down.", "a log"], ["the cat sat", "A dog"]) == pytest.approx(0.4)
    assert M.wer([""], ["two words"]) == pytest.approx(1.0)  # both deleted
    with pytest.raises(ValueError, match="reference 0 is empty"):
        M.wer(["x"], ["..."])
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        M.wer(["a", "b"], ["a"])


def test_bleu_perfect_and_brevity():
    assert M.bleu(["a red circle appears then a chime sounds"],
                  [["a red circle appears then a chime sounds"]]) == pytest.approx(100.0)
    # hypothesis = first 4 of 8 reference words: all n-gram precisions 1, BP = exp(1 - 8/4) = e^-1
    assert M.bleu(["a red circle appears"], ["a red circle appears then a chime sounds"]) == \
        pytest.approx(100 * math.exp(-1), rel=1e-6)
    # several references: a sample with fewer references than the widest is fine
    assert M.bleu(["x y z w", "a b c d"], [["x y z w", "q"], ["a b c d"]]) == pytest.approx(100.0)


def test_meteor_hand_computed_exact_and_stem():
    # 3 of 4 words match, in 1 chunk: P = 3/4, R = 3/4, Fmean = PR / (0.9P + 0.1R) = 0.75;
    # penalty = 0.5 * (1/3)^3 = 1/54; METEOR = 0.75 * (1 - 1/54)
    got = M.meteor(["the red circle appears"], ["the red circle vanishes"], synonyms=False)
    assert got == pytest.approx(100 * 0.75 * (1 - 1 / 54), rel=1e-6)
    # Porter stems match 'appears'/'appear'
    assert M.meteor(["circle appears"], ["circle appear"], synonyms=False) == pytest.approx(
        100 * (1 - 0.5 * (1 / 2) ** 3), rel=1e-6)


def test_cider_orders_captions():
    refs = [["a red circle appears"], ["a blue square appears"], ["a chime sounds"]]
    perfect = M.cider(["a red circle appears", "a blue square appears", "a chime sounds"], refs)
    worse = M.cider(["a red circle appears", "a chime sounds", "a blue square appears"], refs)
    assert perfect > worse >= 0.0


def test_score_task_rules():
    recs = [{"task": "av_matching", "prediction": "Yes.", "reference": "yes"},
            {"task": "av_matching", "prediction": "yes and no", "reference": "yes"},
            {"task": "av_matching", "prediction": "no", "reference": "no"},
            {"task": "av_matching", "prediction": "no", "reference": "yes"}]
    s = score_task("av_matching", recs)
    assert (s["metric"], s["score"], s["n"]) == ("accuracy", 50.0, 4)
    ocr = score_task("ocr", [{"task": "ocr", "prediction": "halt", "reference": "stop",
                              "references": ["stop", "halt", "halt", "go"]}])
    assert ocr["score"] == pytest.approx(100 * 2 / 3)
    mc = score_task("videoqa", [{"task": "videoqa", "prediction": "the girl jumps", "reference": "jumps"}])
    assert mc["score"] == 0.0  # multiple choice needs the exact option
    asr = score_task("asr", [{"task": "asr", "prediction": "seven red", "reference": "seven red blue"}])
    assert (asr["metric"], asr["score"]) == ("wer", pytest.approx(100 / 3))
    avsd = score_task("avsd", [{"task": "avsd", "prediction": "a man", "reference": "a man"}])
    assert avsd["rule"] == "caption (no judge)" and avsd["metric"] == "cider"
    with pytest.raises(ValueError, match="no scoring rule for task 'nope'"):
        score_task("nope", recs)


def test_score_predictions_groups_and_table():
    recs = [{"task": "spoken_qa", "prediction": "red", "reference": "red"},
            {"task": "asr", "prediction": "one", "reference": "one two"}]
    scores = score_predictions(recs)
    assert list(scores) == ["asr", "spoken_qa"]
    assert scores["asr"]["score"] == pytest.approx(50.0)
    table = format_table(scores)
    assert "| asr | wer ↓ (wer) | 50.0 | 1 |" in table
    assert "| spoken_qa | accuracy ↑ (qa) | 100.0 | 1 |" in table


# ----------------------------------------------------------------------------------------------- judge


def test_judge_prompt_and_verdicts():
    p = judge_prompt("avsd", "What is he doing?", "cooking", "he cooks")
    assert p.startswith('Given the question "What is he doing?", is the answer "cooking" equivalent')
    assert parse_verdict("Yes.") is True and parse_verdict(" no, they differ") is False
    with pytest.raises(ValueError, match="must start with Yes or No"):
        parse_verdict("Maybe")
    with pytest.raises(ValueError, match="no judge prompt for task 'asr'"):
        judge_prompt("asr", "", "", "")
    with pytest.raises(ValueError, match="must start with http"):
        Judge(JudgeConfig(base_url="ftp://x", model="m"))


class _Stub(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint: 'Yes' when hypothesis == reference in the prompt, else 'No'."""

    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        prompt = body["messages"][0]["content"]
        quoted = prompt.split('"')
        hyp, ref = (quoted[3], quoted[5]) if prompt.startswith("Given") else (quoted[3], quoted[1])
        reply = {"choices": [{"message": {"role": "assistant", "content": "Yes." if hyp == ref else "No."}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_judge_against_local_stub(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("FAVOR_TEST_JUDGE_KEY", "secret")
        judge = Judge(JudgeConfig(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="stub",
                                  api_key_env="FAVOR_TEST_JUDGE_KEY", timeout_s=10))
        recs = [{"task": "avsd", "question": "What?", "prediction": "a dog", "reference": "a dog"},
                {"task": "avsd", "question": "What?", "prediction": "a cat", "reference": "a dog"},
                {"task": "avssd", "question": "", "prediction": "the drum", "reference": "the drum"}]
        scores = score_predictions(recs, judge=judge)
        assert scores["avsd"]["metric"] == "judge_accuracy" and scores["avsd"]["score"] == 50.0
        assert scores["avssd"]["score"] == 100.0
        assert judge.requests == 3
        last = _Stub.seen[-1]
        assert last["path"] == "/v1/chat/completions" and last["auth"] == "Bearer secret"
        assert last["body"]["model"] == "stub" and last["body"]["temperature"] == 0
    finally:
        server.shutdown()
        server.server_close()


def test_judge_unreachable_is_one_line_error():
    server = HTTPServer(("127.0.0.1", 0), _Stub)
    port = server.server_port
    server.server_close()  # nothing listens on this port now
    judge = Judge(JudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", retries=0, timeout_s=2))
    with pytest.raises(ValueError, match="unreachable"):
        judge("avsd", "q", "a", "b")
