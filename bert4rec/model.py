"""BERT4Rec (Sun et al., CIKM 2019), top to bottom in one file. Tensors in, tensors out.

Tokens: 0 = padding, 1..V = items, V+1 = [MASK]. Sequences are left-padded, so the most
recent position is always the last one, ``T - 1``.

    item + position (+ rating) embeddings -> LayerNorm -> dropout
    -> L x bidirectional Transformer encoder layers (GELU; pre-LN by default, post-LN as in the paper)
    -> output head: GELU(h W + b) -> LayerNorm -> logits = . E^T + b_out  (E tied to the item embedding)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator


class BERT4RecConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_items: int | None = Field(None, gt=0, description="V; set from the vocabulary at training time")
    max_len: int = Field(200, gt=1, description="positions, including the appended [MASK]")
    hidden: int = Field(64, gt=0)
    layers: int = Field(2, gt=0)
    heads: int = Field(2, gt=0)
    ff_mult: int = Field(4, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the embeddings and on each sub-layer's output (the paper's 0.1)")
    attn_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on attention weights")
    norm_first: bool = Field(
        True,
        description="pre-LayerNorm encoder layers; False is the paper's post-LN (slower to leave the popularity plateau)",
    )
    use_ratings: bool | None = Field(
        None,
        description="add a rating embedding (0 = unknown, 1..5 stars); none: when the prepared histories have ratings "
        "(training settles it, and the checkpoint keeps true or false)",
    )
    rating_levels: int = Field(5, gt=0)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "BERT4RecConfig":
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        return self

    def settled(self, num_items: int, has_ratings: bool) -> "BERT4RecConfig":
        """The config a model is built and checkpointed with: ``num_items`` from the vocabulary,
        and ``use_ratings`` when left to the data (none) as whether the histories have ratings."""
        use_ratings = has_ratings if self.use_ratings is None else self.use_ratings
        return self.model_copy(update={"num_items": num_items, "use_ratings": use_ratings})

    def changes_from(self, trained: "BERT4RecConfig") -> list[str]:
        """The settings in which this (requested) config's architecture differs from a
        ``trained`` model's, leaving out what training settles from the data (see
        :meth:`settled`) and the dropout rates, which the same weights train on under any."""
        left_to_data = {"num_items"} | ({"use_ratings"} if self.use_ratings is None else set())
        ignored = left_to_data | {"dropout", "attn_dropout"}
        ours, theirs = self.model_dump(exclude=ignored), trained.model_dump(exclude=ignored)
        return sorted(k for k in ours if ours[k] != theirs.get(k))

    @property
    def vocab_size(self) -> int:
        assert self.num_items is not None, "num_items is set from the vocabulary before building the model"
        return self.num_items + 2

    @property
    def mask_token(self) -> int:
        return self.vocab_size - 1


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention; padding keys are never attended to."""

    def __init__(self, c: BERT4RecConfig):
        super().__init__()
        self.heads = c.heads
        self.qkv = nn.Linear(c.hidden, 3 * c.hidden)
        self.proj = nn.Linear(c.hidden, c.hidden)
        self.attn_dropout = c.attn_dropout

    def forward(self, x: torch.Tensor, keep: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x (B, T, D), keep (B, 1, 1, T) True for real tokens -> (B, T, D); with
        ``last_only``, (B, 1, D): the last position's output alone (its query against every key)."""
        B, T, D = x.shape
        H, hd = self.heads, D // self.heads
        if last_only:
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, -1:], w[:D], b[:D]).view(B, 1, 1, H, hd)
            kv = F.linear(x, w[D:], b[D:]).view(B, T, 2, H, hd)
            q, k, v = q.permute(2, 0, 3, 1, 4)[0], *kv.permute(2, 0, 3, 1, 4)  # (B, H, 1 | T, hd)
            T = 1
        else:
            q, k, v = self.qkv(x).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.attn_dropout if self.training else 0.0)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class TransformerLayer(nn.Module):
    """Attention and a GELU feed-forward, each with dropout and a residual connection;
    LayerNorm before each sub-layer (pre-LN) or after the residual sum (post-LN, the paper)."""

    def __init__(self, c: BERT4RecConfig):
        super().__init__()
        self.norm_first = c.norm_first
        self.attn = SelfAttention(c)
        self.norm1 = nn.LayerNorm(c.hidden)
        self.ff = nn.Sequential(nn.Linear(c.hidden, c.ff_mult * c.hidden), nn.GELU(), nn.Linear(c.ff_mult * c.hidden, c.hidden))
        self.norm2 = nn.LayerNorm(c.hidden)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, T, D) -> (B, T, D), or with ``last_only`` the last position's (B, 1, D): every
        position is a key, only the last is a query, and the feed-forward runs on it alone."""
        residual = x[:, -1:] if last_only else x
        if self.norm_first:
            x = residual + self.drop(self.attn(self.norm1(x), keep, last_only))
            return x + self.drop(self.ff(self.norm2(x)))
        x = self.norm1(residual + self.drop(self.attn(x, keep, last_only)))
        return self.norm2(x + self.drop(self.ff(x)))


class BERT4Rec(nn.Module):
    def __init__(self, config: BERT4RecConfig, init_weights: bool = True):
        """``init_weights=False``: for weights that a checkpoint will replace; skips the
        model's own initialisation (its truncated normal over the item embedding takes
        seconds at a million items)."""
        super().__init__()
        self.config = config
        c = config
        self.item_emb = nn.Embedding(c.vocab_size, c.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(c.max_len, c.hidden)
        self.rating_emb = nn.Embedding(c.rating_levels + 1, c.hidden, padding_idx=0) if c.use_ratings else None
        self.emb_norm = nn.LayerNorm(c.hidden)
        self.emb_drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(TransformerLayer(c) for _ in range(c.layers))
        # pre-LN layers leave the residual stream un-normalised: one LayerNorm closes the stack
        self.final_norm = nn.LayerNorm(c.hidden) if c.norm_first else nn.Identity()
        self.head = nn.Linear(c.hidden, c.hidden)
        self.head_norm = nn.LayerNorm(c.hidden)
        self.out_bias = nn.Parameter(torch.zeros(c.vocab_size))
        if init_weights:
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Embeddings: BERT's truncated normal(0.02), which keeps the first logits (through the
        # tied output layer) small. Linear layers: Xavier, scaled to their width. BERT's 0.02
        # suits hidden 768 (each layer then keeps ~0.55 of its input's scale); at hidden 64 it
        # keeps ~0.16, the attention and feed-forward branches start nearly switched off, and
        # training sits for many epochs on the popularity plateau before it learns to use context.
        if isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def encode(self, tokens: torch.Tensor, ratings: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """(B, T) tokens [, (B, T) ratings 0..5] -> (B, T, D) hidden states after the output
        transform; with ``last_only``, (B, 1, D) for the last position alone (the final layer
        then computes nothing the other positions' outputs would need)."""
        B, T = tokens.shape
        assert T <= self.config.max_len, f"sequence length {T} > max_len {self.config.max_len}"
        # left padding: the last input position is always position max_len - 1
        pos = torch.arange(self.config.max_len - T, self.config.max_len, device=tokens.device)
        x = self.item_emb(tokens) + self.pos_emb(pos)[None]  # (B, T, D)
        if self.rating_emb is not None and ratings is not None:
            x = x + self.rating_emb(ratings)
        x = self.emb_drop(self.emb_norm(x))
        keep = (tokens != 0)[:, None, None, :]  # (B, 1, 1, T): attend to real tokens only
        for i, layer in enumerate(self.layers):
            x = layer(x, keep, last_only and i == len(self.layers) - 1)  # (B, T, D); (B, 1, D) after a last_only layer
        x = self.final_norm(x)
        return self.head_norm(F.gelu(self.head(x)))  # (B, T, D)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V+2) scores over every token, through the tied item embedding."""
        return h @ self.item_emb.weight.T + self.out_bias

    def forward(
        self,
        tokens: torch.Tensor,
        ratings: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        hidden_only: bool = False,
    ) -> torch.Tensor:
        """Logits at the masked positions only (the Cloze loss needs nothing else).

        tokens (B, T); positions: a (B, T) bool mask of the positions to score, default the
        [MASK] tokens. Returns (M, V+2) for the M selected positions, in row-major order, or
        with ``hidden_only`` their (M, D) hidden states (a sampled softmax scores them itself;
        through ``forward``, so that DDP sees the call).
        """
        h = self.encode(tokens, ratings)  # (B, T, D)
        if positions is None:
            positions = tokens == self.config.mask_token
        if hidden_only:
            return h[positions]  # (M, D)
        return self.logits(h[positions])  # (M, V+2)

    def last_hidden(self, tokens: torch.Tensor, ratings: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) sequences ending in [MASK] -> (B, D) hidden state of that last position
        (``encode(tokens)[:, -1]``, up to float rounding, with the final layer run for it alone)."""
        return self.encode(tokens, ratings, last_only=True)[:, 0]


def cloze_loss(model: BERT4Rec, tokens: torch.Tensor, labels: torch.Tensor, ratings: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the masked positions, a full softmax over the catalogue.
    labels (B, T): the true token where masked, 0 elsewhere."""
    positions = labels > 0
    logits = model(tokens, ratings, positions)  # (M, V+2)
    return F.cross_entropy(logits.float(), labels[positions])


def sampled_cloze_loss(
    model: nn.Module,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    ratings: torch.Tensor | None,
    negatives: torch.Tensor,
    log_q: torch.Tensor,
) -> torch.Tensor:
    """Cloze cross-entropy with a sampled softmax (Jean et al. 2015) and the logQ correction
    (Bengio & Senecal 2008; Yi et al. 2019): each masked position scores its target against
    ``negatives`` (N,) item tokens shared by the batch, drawn with replacement from a
    distribution q; every logit is lowered by ``log_q`` (V+2,) = log(N q(item)), so that the
    loss is an unbiased-in-the-limit estimate of the full softmax's. A negative that is the
    position's own target (an accidental hit) is masked out.

    Memory is (M, N) instead of (M, V): what makes million-item catalogues trainable.
    """
    positions = labels > 0
    h = model(tokens, ratings, positions, hidden_only=True)  # (M, D)
    target = labels[positions]  # (M,)
    core = getattr(model, "module", model)  # the model itself, under a DistributedDataParallel wrapper
    w, b = core.item_emb.weight, core.out_bias
    pos = (h * w[target]).sum(-1) + b[target] - log_q[target]  # (M,)
    neg = h @ w[negatives].T + (b[negatives] - log_q[negatives])  # (M, N)
    neg = neg.masked_fill(negatives[None, :] == target[:, None], float("-inf"))
    logits = torch.cat([pos[:, None], neg], dim=1).float()  # (M, 1 + N)
    return F.cross_entropy(logits, torch.zeros(len(target), dtype=torch.long, device=logits.device))


def negative_sampler(counts: torch.Tensor, num_negatives: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling distribution of :func:`sampled_cloze_loss`: q(item) proportional to
    ``count ** alpha`` over items 1..V (``alpha`` 0: uniform; padding and [MASK] never drawn).
    counts (V+2,) by token. Returns (q (V+2,), log_q (V+2,) = log(num_negatives x q))."""
    q = counts.double().clamp(min=0) ** alpha if alpha else torch.ones(len(counts), dtype=torch.float64, device=counts.device)
    q[0] = 0
    q[-1] = 0
    if q.sum() <= 0:
        q[1:-1] = 1
    q = q / q.sum()
    # an item that can never be drawn keeps a finite correction (it only appears as a target)
    log_q = torch.log((num_negatives * q).clamp(min=1e-30)).float()
    return q.float(), log_q
