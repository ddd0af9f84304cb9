"""FavorModel: the stages assembled. No I/O; tensors in, tensors (or text from ``generate``) out.

    mel -> AudioEncoder -> audio_proj --\\
                                         sync.align -> windows -> CausalQFormer -> Projector -> LLM
    pixels -> VisualEncoder ------------/

Training, export and the runtime all build this same object (``favor.build.build_model``).

Notation: B batch, T frames, W windows, Nq queries per window, H Q-Former width, D LLM width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from favor import sync, windows
from favor.alignment import word_alignment_loss
from favor.config import FavorConfig
from favor.generation import resolve_instruction_tokenizer  # noqa: F401 (re-exported; lives with instruction_inputs)
from favor.llm import LLM
from favor.projector import Projector
from favor.prompt import PromptIds
from favor.qformer import CausalQFormer
from favor.synchrony import SyncHead, partners, synchrony_loss


@dataclass
class AVEmbeddings:
    embeds: torch.Tensor  # [B, W*Nq, D] LLM-space AV tokens
    mask: torch.Tensor  # [B, W*Nq] bool, False for windows made only of padding
    queries: torch.Tensor  # [B, W, Nq, H] Q-Former outputs (the diversity loss reads these)
    window_mask: torch.Tensor  # [B, W] bool


def diversity_loss(queries: torch.Tensor, window_mask: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of the Nq queries of each window, diagonal excluded.

    queries [B, W, Nq, H]; averaged over valid windows (the release's ``calc_diversity_loss``).
    """
    Nq = queries.shape[-2]
    if Nq < 2:
        return queries.new_zeros(())
    q = nn.functional.normalize(queries.float(), dim=-1)
    sim = q @ q.transpose(-1, -2)  # [B, W, Nq, Nq]
    off_diag = sim.sum((-1, -2)) - sim.diagonal(dim1=-2, dim2=-1).sum(-1)  # [B, W]
    per_window = off_diag / (Nq * (Nq - 1))
    w = window_mask.float()
    return (per_window * w).sum() / w.sum().clamp(min=1.0)


# The inputs of FavorModel.encode_av, under the names a collated batch (training/collate.py) uses.
AV_INPUTS = ("mel", "pixels", "instruction_ids", "instruction_mask", "modality_mask", "frame_lengths",
             "is_image", "visual_lengths", "audio_lengths")


def av_inputs(batch: dict) -> dict:
    """The ``encode_av`` keyword arguments found in ``batch`` (absent keys keep their defaults)."""
    return {k: batch[k] for k in AV_INPUTS if k in batch}


class FavorModel(nn.Module):
    def __init__(self, cfg: FavorConfig, audio_encoder: nn.Module, visual_encoder: nn.Module,
                 qformer: CausalQFormer, projector: Projector, llm: LLM, *, tokenizer=None,
                 instruction_tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.audio_encoder = audio_encoder
        self.visual_encoder = visual_encoder
        self.audio_proj = nn.Linear(cfg.audio.d_model, cfg.audio_proj_dim)  # speech_pre_qformer_proj
        self.qformer = qformer
        self.projector = projector
        self.llm = llm
        self.tokenizer = tokenizer  # LLM tokenizer (text <-> ids); not a module, not saved
        self._instruction_tokenizer = instruction_tokenizer
        # demo-only training head of favor/synchrony.py's objective; absent when the config does not train it
        self.sync_head = SyncHead(cfg.llm.hidden) if cfg.sync_loss_weight > 0 else None
        self.configure_trainable()

    @property
    def instruction_tokenizer(self):
        """The visual Q-Former's instruction tokenizer (see ``resolve_instruction_tokenizer``)."""
        return resolve_instruction_tokenizer(self.cfg, self._instruction_tokenizer, self.tokenizer)

    @instruction_tokenizer.setter
    def instruction_tokenizer(self, value) -> None:
        self._instruction_tokenizer = value

    # -- trainable parts --------------------------------------------------------------------------
    def configure_trainable(self) -> None:
        """Release: Q-Former, queries, norms, position embedding, projections and LoRA train."""
        for p in self.parameters():
            p.requires_grad_(False)
        for m in (self.audio_proj, self.qformer, self.projector, self.sync_head):
            if m is not None:
                m.requires_grad_(True)
        for name, p in self.llm.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
        if self.cfg.trainable_visual:  # demo preset only: no pretrained vision weights offline
            self.visual_encoder.requires_grad_(True)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def train(self, mode: bool = True) -> FavorModel:
        super().train(mode)
        # Frozen encoders stay in eval (no dropout), as the release freezes them with .eval().
        if not self.cfg.trainable_visual:
            self.visual_encoder.eval()
        self.audio_encoder.eval()
        return self

    # -- encoding ---------------------------------------------------------------------------------
    def encode_audio(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, n_mels, Tm] -> projected audio tokens [B, Ta, Da] at 50 Hz."""
        return self.audio_proj(self.audio_encoder(mel))

    def encode_visual(self, pixels: torch.Tensor, instruction_ids: torch.Tensor,
                      instruction_mask: torch.Tensor) -> torch.Tensor:
        """pixels [B, T, 3, S, S] -> visual tokens [B, T, Qv, Dv]."""
        return self.visual_encoder(pixels, instruction_ids, instruction_mask)

    def _window_queries(self, x: torch.Tensor, fmask: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames [B, T, S, E] -> queries [B, W, Nq, H] and window mask [B, W]."""
        B = x.shape[0]
        win, tmask = windows.split_windows(x, self.cfg.timing.frames_per_window, fmask)  # [B, W, L, E]
        q = self.qformer(win.flatten(0, 1), tmask.flatten(0, 1))  # [B*W, Nq, H]
        return q.view(B, win.shape[1], *q.shape[1:]), tmask.any(-1)

    def fuse(self, visual: torch.Tensor | None, audio: torch.Tensor | None,
             modality_mask: torch.Tensor | None = None, frame_lengths: torch.Tensor | None = None,
             num_frames: int | None = None, visual_lengths: torch.Tensor | None = None,
             audio_lengths: torch.Tensor | None = None) -> AVEmbeddings:
        """sync -> windows -> causal Q-Former -> projector (the exported 'fusion' stage).

        For batches of unequal media, ``visual_lengths`` (frames) and ``audio_lengths`` (audio tokens)
        zero each sample's batch padding, and frames past max(video, audio) of a sample are masked.
        """
        if visual is not None and visual_lengths is not None:
            keep = torch.arange(visual.shape[1], device=visual.device)[None] < visual_lengths[:, None]
            visual = visual * keep[:, :, None, None].to(visual.dtype)  # [B, Tv, Qv, Dv]
        if audio is not None and audio_lengths is not None:
            keep = torch.arange(audio.shape[1], device=audio.device)[None] < audio_lengths[:, None]
            audio = audio * keep[:, :, None].to(audio.dtype)  # [B, Ta, Da]
        if frame_lengths is None and (visual_lengths is not None or audio_lengths is not None):
            B = (visual if visual is not None else audio).shape[0]
            zero = torch.zeros(B, dtype=torch.long)
            v = visual_lengths.cpu() if visual_lengths is not None else zero
            a = audio_lengths.cpu() if audio_lengths is not None else zero
            a_frames = torch.tensor([sync.audio_frames(int(n), self.cfg) for n in a])
            frame_lengths = torch.maximum(v, a_frames)
        x = sync.align(visual, audio, self.cfg, modality_mask, num_frames)  # [B, T, S, E]
        B, T = x.shape[:2]
        fmask = sync.frame_mask(frame_lengths.to(x.device), T) if frame_lengths is not None else None
        if self.cfg.synchronise:
            q, window_mask = self._window_queries(x, fmask)  # [B, W, Nq, H]
        else:
            # Ablation "without synchronisation": each modality passes the Q-Former on its own, so audio
            # and vision meet only in the LLM; a window yields its visual then its audio queries.
            Dv = self.cfg.visual_width
            qv, window_mask = self._window_queries(torch.cat([x[..., :Dv], torch.zeros_like(x[..., Dv:])], -1),
                                                   fmask)
            qa, _ = self._window_queries(torch.cat([torch.zeros_like(x[..., :Dv]), x[..., Dv:]], -1), fmask)
            q = torch.cat([qv, qa], dim=2)  # [B, W, 2*Nq, H]
        W, Nq = q.shape[1], q.shape[2]
        embeds = self.projector(q).reshape(B, W * Nq, -1)  # [B, W*Nq, D]
        mask = window_mask[:, :, None].expand(B, W, Nq).reshape(B, W * Nq)
        return AVEmbeddings(embeds, mask, q, window_mask)

    def encode_av(self, *, mel: torch.Tensor | None = None, pixels: torch.Tensor | None = None,
                  instruction_ids: torch.Tensor | None = None,
                  instruction_mask: torch.Tensor | None = None,
                  modality_mask: torch.Tensor | None = None,
                  frame_lengths: torch.Tensor | None = None, is_image: bool = False,
                  visual_lengths: torch.Tensor | None = None,
                  audio_lengths: torch.Tensor | None = None) -> AVEmbeddings:
        """Media tensors -> LLM-space AV embeddings. An image with audio repeats over the audio.

        Keyword-only (nine optional inputs are easy to pass in the wrong order); from a collated batch
        use ``encode_av(**av_inputs(batch))``.
        """
        visual, audio = self.encode_media(mel, pixels, instruction_ids, instruction_mask, is_image)
        return self.fuse(visual, audio, modality_mask, frame_lengths,
                         visual_lengths=visual_lengths, audio_lengths=audio_lengths)

    def encode_media(self, mel: torch.Tensor | None, pixels: torch.Tensor | None,
                     instruction_ids: torch.Tensor | None, instruction_mask: torch.Tensor | None,
                     is_image: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The two encoders: visual tokens [B, T, Qv, Dv] (an image with audio repeated over the audio's
        frames) and projected audio tokens [B, Ta, Da]; None for an absent modality."""
        audio = self.encode_audio(mel) if mel is not None else None
        visual = None
        if pixels is not None:
            if instruction_ids is None:
                raise ValueError("the visual encoder needs instruction_ids (the prompt's tokens)")
            visual = self.encode_visual(pixels, instruction_ids, instruction_mask)
            if is_image and audio is not None:
                visual = sync.repeat_image(visual, sync.audio_frames(audio.shape[1], self.cfg))
        return visual, audio

    # -- training ---------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """loss = lm_loss_weight x CE + lambda x diversity (+ the demo's word-alignment and synchrony terms
        when the config weighs them). batch: media tensors (see encode_av) + ``prompts``."""
        visual, audio = self.encode_media(batch.get("mel"), batch.get("pixels"), batch.get("instruction_ids"),
                                          batch.get("instruction_mask"), batch.get("is_image", False))
        av = self.fuse(visual, audio, batch.get("modality_mask"), batch.get("frame_lengths"),
                       visual_lengths=batch.get("visual_lengths"), audio_lengths=batch.get("audio_lengths"))
        ce = self._lm_loss(batch["prompts"], av)
        div = diversity_loss(av.queries, av.window_mask)
        loss = self.cfg.lm_loss_weight * ce + self.cfg.diversity_loss_weight * div
        align = ce.new_zeros(())
        if self.cfg.word_alignment_weight > 0 and batch.get("window_words") is not None:
            B, W, Nq = av.queries.shape[:3]
            tokens = av.embeds.view(B, W, Nq, -1)  # [B, W, Nq, D]
            table = self.llm.embed(batch["alignment_ids"])  # [K, D] the world words' input embeddings
            align = word_alignment_loss(tokens, av.window_mask, table, batch["window_words"])
            loss = loss + self.cfg.word_alignment_weight * align
        synchrony = ce.new_zeros(())
        if self.sync_head is not None and batch.get("own_soundtrack") is not None and visual is not None \
                and audio is not None:
            synchrony = self._synchrony_loss(visual, audio, batch)
            loss = loss + self.cfg.sync_loss_weight * synchrony
        return {"loss": loss, "ce": ce.detach(), "diversity": div.detach(), "alignment": align.detach(),
                "synchrony": synchrony.detach()}

    def _lm_loss(self, prompts: list[PromptIds], av: AVEmbeddings) -> torch.Tensor:
        """Answer-token CE through the LLM; not computed (0) in a fusion warm-up (lm_loss_weight 0)."""
        if self.cfg.lm_loss_weight == 0:
            return av.embeds.new_zeros(())
        return self.llm(self.llm.splice(prompts, av.embeds, av.mask), per_sample=self.cfg.ce_per_sample)

    def _synchrony_loss(self, visual: torch.Tensor, audio: torch.Tensor, batch: dict) -> torch.Tensor:
        """favor/synchrony.py: the rows playing their own soundtrack, fused with it and with another row's
        (one Q-Former pass over both, so padding treats them alike); 0 when no row has a partner."""
        pairs = partners(batch["own_soundtrack"].tolist(), batch.get("audio_keys") or [None] * audio.shape[0])
        if not pairs:
            return audio.new_zeros(())
        rows, others = (torch.tensor(ix, device=audio.device) for ix in zip(*pairs, strict=True))
        lengths = batch["audio_lengths"].to(audio.device)
        v = visual[rows]
        lv = batch["visual_lengths"].to(audio.device)[rows] if batch.get("visual_lengths") is not None else None
        both = self.fuse(torch.cat([v, v]), torch.cat([audio[rows], audio[others]]),
                         visual_lengths=None if lv is None else torch.cat([lv, lv]),
                         audio_lengths=torch.cat([lengths[rows], lengths[others]]))
        B, W, Nq = both.queries.shape[:3]
        logits = self.sync_head(both.embeds.view(B, W, Nq, -1), both.window_mask)  # [2n]
        return synchrony_loss(logits[: len(pairs)], logits[len(pairs):])
