"""The causal Q-Former: N learned queries read one window of fused audio-visual tokens.

    x = LayerNorm(window tokens) + learned position embedding (token index inside the window)
    per layer i:
        enc_i = BlockCausalSelfAttention_i(x)     # at encoder width E; NOT chained across layers
        q = SelfAttention(q)                      # the N queries, width H, unmasked
        q = CrossAttention(q, enc_i, padding)     # queries read the window (padding masked)
        q = FFN(q)
    out = q  [N_windows, N, H]

Parameter names follow the release's BERT Q-Former (``video_Qformer.bert...``) so the authors'
checkpoint maps by prefix; the release's quirks are config switches (FAVOR-SPEC.md section 4):
`orientation` ('future' = the release's triu mask) and `mask_padding_in_causal` (False = release).

Notation: N windows in the batch (B*W), L = F*S tokens per window, E encoder width, H hidden,
Nq queries per window, h heads.
"""

from __future__ import annotations

import torch
from torch import nn

from favor.attention import window_attention
from favor.config import FavorConfig, QFormerConfig


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    N, L, D = x.shape
    return x.view(N, L, h, D // h).transpose(1, 2)  # [N, h, L, D/h]


def _merge(x: torch.Tensor) -> torch.Tensor:
    N, h, L, d = x.shape
    return x.transpose(1, 2).reshape(N, L, h * d)  # [N, L, h*d]


class SelfOutput(nn.Module):
    """BERT's residual block: LayerNorm(dropout(dense(x)) + residual)."""

    def __init__(self, width: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Projections(nn.Module):
    """query/key/value linears (BERT's ``self`` submodule); keys/values may come from another width."""

    def __init__(self, width: int, kv_width: int):
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)


class Attention(nn.Module):
    """Multi-head attention with BERT names (``self``, ``output``); width <- kv_width."""

    def __init__(self, width: int, kv_width: int, heads: int, cfg: QFormerConfig):
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.heads = heads
        self.self = Projections(width, kv_width)
        self.output = SelfOutput(width, cfg.ln_eps, cfg.dropout)
        self.attn_dropout = cfg.dropout

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if kv is None else kv
        q = _heads(self.self.query(x), self.heads)  # [N, h, Lq, d]
        k = _heads(self.self.key(kv), self.heads)  # [N, h, Lk, d]
        v = _heads(self.self.value(kv), self.heads)
        bias = None
        if key_mask is not None:
            # BERT's additive mask: dtype-min, not -inf, so a fully padded window stays finite.
            bias = (~key_mask.bool())[:, None, None, :].to(q.dtype) * torch.finfo(q.dtype).min
        p = self.attn_dropout if self.training else 0.0
        ctx = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        return self.output(_merge(ctx), x)


class CausalEncoderAttention(nn.Module):
    """Block-causal self-attention over a window's tokens at encoder width (``encoder_causal_attention``)."""

    def __init__(self, width: int, heads: int, tokens_per_frame: int, cfg: QFormerConfig):
        super().__init__()
        if width % heads:
            raise ValueError(f"encoder width ({width}) must be divisible by encoder heads ({heads})")
        self.heads, self.tokens_per_frame, self.cfg = heads, tokens_per_frame, cfg
        self.self = Projections(width, width)
        self.output = SelfOutput(width, cfg.ln_eps, cfg.dropout)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        q = _heads(self.self.query(x), self.heads)  # [N, h, L, E/h]
        k = _heads(self.self.key(x), self.heads)
        v = _heads(self.self.value(x), self.heads)
        pad = token_mask if self.cfg.mask_padding_in_causal else None
        ctx = window_attention(q, k, v, self.tokens_per_frame, self.cfg.orientation, pad)
        return self.output(_merge(ctx), x)


class Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class QFormerLayer(nn.Module):
    def __init__(self, cfg: FavorConfig):
        super().__init__()
        q, E = cfg.qformer, cfg.fused_width
        self.causal_encoder = q.causal_encoder
        if q.causal_encoder:
            self.encoder_causal_attention = CausalEncoderAttention(E, q.encoder_heads,
                                                                   cfg.tokens_per_frame, q)
        self.attention = Attention(q.hidden, q.hidden, q.heads, q)
        self.crossattention = Attention(q.hidden, E, q.heads, q)
        self.intermediate_query = Dense(q.hidden, q.ffn_dim)
        self.output_query = SelfOutput(q.hidden, q.ln_eps, q.dropout)
        self.output_query.dense = nn.Linear(q.ffn_dim, q.hidden)  # 3072 -> 768

    def forward(self, queries: torch.Tensor, enc: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        if self.causal_encoder:
            enc = self.encoder_causal_attention(enc, token_mask)  # [N, L, E]
        queries = self.attention(queries)  # [N, Nq, H]
        queries = self.crossattention(queries, enc, token_mask)  # [N, Nq, H]
        hidden = nn.functional.gelu(self.intermediate_query.dense(queries))  # [N, Nq, ffn]
        return self.output_query(hidden, queries)


class _Embeddings(nn.Module):
    def __init__(self, q: QFormerConfig):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(q.hidden, eps=q.ln_eps)
        self.dropout = nn.Dropout(q.dropout)


class _Encoder(nn.Module):
    def __init__(self, cfg: FavorConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg) for _ in range(cfg.qformer.layers))


class _Bert(nn.Module):
    def __init__(self, cfg: FavorConfig):
        super().__init__()
        self.embeddings = _Embeddings(cfg.qformer)
        self.encoder = _Encoder(cfg)


class CausalQFormer(nn.Module):
    """Window tokens [N, L, E] + mask [N, L] -> queries [N, Nq, H]. Random init as in the release."""

    def __init__(self, cfg: FavorConfig):
        super().__init__()
        q = cfg.qformer
        self.cfg = cfg
        self.ln = nn.LayerNorm(cfg.fused_width)  # release: ln_video, default eps
        self.position_embedding = nn.Embedding(q.max_positions, cfg.fused_width)
        self.query_tokens = nn.Parameter(torch.zeros(1, q.num_queries, q.hidden))
        self.bert = _Bert(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Inside the BERT Q-Former, BERT _init_weights: normal(0, 0.02) weights, zero biases,
        # LayerNorm (1, 0); the query tokens normal(0, 0.02) (FAVOR-SPEC.md section 4). The position
        # table is the release's plain top-level nn.Embedding (video_frame_position_embedding), which
        # BERT's init never reaches: PyTorch's default N(0, 1). Same draw order as before, so only
        # the table's scale changed.
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=1.0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.query_tokens, std=0.02)
        if self.cfg.qformer.window_init == "xavier":  # after BERT's draws: "bert" runs draw exactly as before
            for layer in self.bert.encoder.layer:
                readers = [layer.crossattention] + ([layer.encoder_causal_attention] if layer.causal_encoder else [])
                for att in readers:
                    for lin in (att.self.query, att.self.key, att.self.value, att.output.dense):
                        nn.init.xavier_uniform_(lin.weight)

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        N, L, E = tokens.shape
        if E != self.cfg.fused_width:
            raise ValueError(f"window tokens must have width {self.cfg.fused_width}, got {E}")
        positions = torch.arange(L, device=tokens.device)  # restarts every window
        x = self.ln(tokens) + self.position_embedding(positions)[None]  # [N, L, E]
        emb = self.bert.embeddings
        queries = emb.dropout(emb.LayerNorm(self.query_tokens.expand(N, -1, -1)))  # [N, Nq, H]
        for layer in self.bert.encoder.layer:
            queries = layer(queries, x, token_mask)  # every layer re-reads the same x
        return queries

