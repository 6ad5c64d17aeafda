"""SASRec (Kang & McAuley, ICDM 2018; docs/models.md, "SASRec") as a CTR baseline: causal
self-attention over the history, the last position's hidden state as a candidate-independent user
vector (computed once per user in `encode_user`), scored against the target.

This is the Target-Decoupled SASRec class (`td_sasrec.py`) with the decoupling switched off, not
a second implementation: `decouple="none"` is plain SASRec (one encoding, one user vector
whatever the target type), and every other piece of the paper's model is already there:

* Tokens: item + category embeddings (the item-side fields shared by history and target,
  concatenated, so d = embed_dim x n_fields = 32 by default) plus a learned position
  embedding. The positions are target-relative (1 = most recent), which is exactly the original's
  "absolute" position: SASRec left-pads every sequence to its fixed length n, so the slot of the
  behaviour at relative position r is always n - r; counting from the end keeps that meaning when
  batches are padded to varying lengths.
* Encoder: `n_layers` = 2 blocks of [causal multi-head self-attention -> point-wise 2-layer ReLU
  FFN (d -> d -> d)], residuals, LayerNorm before each sub-layer plus a final LayerNorm (as the
  authors' code normalises), dropout on inputs, attention weights and residual branches.
  Padding is masked out of every attention (causal + key-padding mask).
* User vector: the last position's hidden state, F_t in the paper (the encoder runs its last
  layer for that position only).
* Read-out [INFER] (`readout="tokens"`, `readout_score="both"`; docs/models.md): the MLP
  head also gets the target's attention over the behaviour embeddings, [r, r ⊙ v_t], with
  DIN's scorer and a cosine scorer (`nn/readout.py`): the last hidden state alone stayed near
  chance on MovieLens. `readout="last"` is the paper's model.
* Head: `head="mlp"` (default): DARE's BN-200-80 MLP on [u, v_t, u ⊙ v_t]; `head="dot"`:
  <u, v_t> + b, the original's r = <F_t, M_i> plus a learned intercept (a CTR model needs one;
  SASRec's sampled-negative loss does not). v_t is the target's plain item embedding M_i (same
  tables as the history; `target_pos=False`: no position vector is added to the target).

[INFER] CTR defaults that differ from the next-item paper: 1 head (the paper's default; the
brief allows 1-2), d = the field dims (32, the paper uses 50), dropout 0 (the paper: 0.2 / 0.5;
set `dropout` for sparse data), embeddings N(0, 0.01) as every DARE-family model here.
Not reproduced: the sqrt(d) scaling of item embeddings in the authors' code (a reparametrisation
of the tables), its un-normalised attention keys (the keys use the same LayerNorm as the
queries), the shared-table next-item training objective (we train the CTR BCE of the batch).
The target-type options of `td_sasrec` (`type_in_head`, `decouple`) stay available as
parameters; with `decouple` other than "none" the model *is* td_sasrec.
"""

from __future__ import annotations

from longrec.models.registry import register_variant
from longrec.models.td_sasrec import TdSasrecModel

SASREC_PRESET = {
    "decouple": "none",
    "target_pos": False,
    "n_heads": 1,
    "readout": "tokens",
    "readout_score": "both",
}

register_variant(
    "sasrec",
    TdSasrecModel,
    "SASRec: causal self-attention, last hidden state as the user vector; MLP or dot head (ICDM'18)",
    **SASREC_PRESET,
)
