"""Hugging Face ``transformers`` causal LMs (``AutoModelForCausalLM``-style), as they come.

Prompt-conditioned DDO (Zheng et al. 2025, Eq. 13; the SPIN-like use on language models): a real
sample is the data's response y to a prompt c, a fake one the reference's own continuation of a
prompt, and the log-ratio counts the response tokens only,

    r(c, y) = sum_{i in response} log p_theta(y_i | c, y_<i) - log p_ref(y_i | c, y_<i),

L = -E_real[log sigma(beta r)] - alpha E_fake[log sigma(-beta r)].

Data (HF convention): ``input_ids`` [N, L], ``labels`` [N, L] equal to ``input_ids`` on response
tokens and -100 on prompt and padding, optional ``attention_mask`` [N, L] (default: all ones
for a dict, each row's own length for a list of dicts). HF logits at position i
predict token i + 1, so the adapter shifts the labels itself (targets_i = labels_{i+1}); rows may
be left- or right-padded: ``position_ids`` = cumsum(attention_mask) - 1 make a padded row score
exactly as the unpadded one (up to float rounding of the different shapes).

:meth:`HFCausalLM.prepare_data` packs the data into what :func:`ddo_fast.train` streams: x
[N, 3, L] int64 (ids, labels, mask) and a "label" per row that is its prompt's index, so the
loop's class-balanced fake pool is one continuation per prompt and online fakes continue the real
batch's prompts.
"""

from __future__ import annotations

import hashlib
import inspect
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import (
    ar_ddo_loss,
    fused_linear_ar_ddo_loss,
    fused_linear_sequence_logprob,
    sequence_logprob,
)
from .base import Adapter, Batch, LossOutput, pair_mask

IGNORE = -100
# config fields (on the config or its text_config) of models whose logits are not
# hidden @ W^T (+ b): the fused path would be wrong. A known-names guard only; the numeric check
# in HFCausalLM.head_of catches transforms this list misses.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_softcapping",
    "logits_soft_cap",
    "logit_scale",
    "logits_scaling",
    "logit_scaling",
    "output_mult",
    "lm_head_multiplier",
    "mup_width_scale",
)
# model -> None (logits == head(hidden_states[-1])) or why not; checked once per model
_HEAD_CHECK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _as_long(name: str, value: Any) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.dtype.is_floating_point or t.dtype == torch.bool and name != "attention_mask":
        raise TypeError(f"HFCausalLM: `{name}` must hold integers, got dtype {t.dtype}")
    return t.long()


def _collate(rows: Any) -> dict[str, torch.Tensor]:
    """A sequence of dicts (list, torch or HF Dataset) -> dict of [N, L] tensors, each row
    right-padded (ids 0, labels -100, mask 0) to the longest; a missing attention_mask is 1 on
    each row's own tokens."""
    n = len(rows)
    if n == 0:
        raise ValueError("HFCausalLM: the data is empty")
    items = [rows[i] for i in range(n)]
    if not isinstance(items[0], Mapping):
        raise TypeError(
            "HFCausalLM: data must be a dict of tensors or a sequence/Dataset of dicts with "
            f"'input_ids' and 'labels', got items of type {type(items[0]).__name__}"
        )
    out = {}
    keys = ("input_ids", "labels", "attention_mask")
    for key in [k for k in keys if k in items[0]]:
        seqs = [_as_long(key, it[key]).reshape(-1) for it in items]
        fill = IGNORE if key == "labels" else 0
        width = max(len(s) for s in seqs)
        out[key] = torch.full((n, width), fill, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[key][i, : len(s)] = s
    if "attention_mask" not in out:  # the rows' own lengths, not the padding
        lengths = torch.tensor(
            [len(_as_long("input_ids", it["input_ids"]).reshape(-1)) for it in items]
        )
        out["attention_mask"] = (torch.arange(out["input_ids"].shape[1]) < lengths[:, None]).long()
    return out


def pack(data: Any) -> torch.Tensor:
    """Validated HF-convention data -> x [N, 3, L] int64: input_ids, labels, attention_mask.

    ``attention_mask`` defaults to all ones. Every row needs at least one response token
    (label != -100) at a position the mask keeps, and not at position 0 (nothing predicts it).
    """
    cols = dict(data) if isinstance(data, Mapping) else _collate(data)
    for key in ("input_ids", "labels"):
        if key not in cols:
            raise KeyError(
                f"HFCausalLM: data has no '{key}' (keys: {sorted(cols)}); it needs 'input_ids' "
                "and 'labels' [N, L] (labels -100 on prompt and padding), optional "
                "'attention_mask'"
            )
    ids = _as_long("input_ids", cols["input_ids"])
    labels = _as_long("labels", cols["labels"])
    mask = cols.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else _as_long("attention_mask", mask)
    if ids.dim() != 2:
        raise ValueError(f"HFCausalLM: input_ids must be [N, L], got {list(ids.shape)}")
    for name, t in (("labels", labels), ("attention_mask", mask)):
        if t.shape != ids.shape:
            raise ValueError(
                f"HFCausalLM: {name} {list(t.shape)} must have input_ids' shape {list(ids.shape)}"
            )
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("HFCausalLM: attention_mask must hold 0/1")
    resp = labels != IGNORE
    if (resp & (labels != ids)).any():
        raise ValueError(
            "HFCausalLM: labels must equal input_ids where they are not -100 (HF convention, "
            "unshifted: the adapter shifts them)"
        )
    if (resp & (mask == 0)).any():
        raise ValueError("HFCausalLM: a labelled token has attention_mask 0")
    if resp[:, 0].any() or not resp.any(1).all() or (resp[:, 1:] & (mask[:, :-1] == 0)).any():
        raise ValueError(
            "HFCausalLM: every row needs a response token (label != -100) after at least one "
            "prompt token with attention_mask 1 (nothing predicts position 0, and a token after "
            "padding would be predicted from a pad)"
        )
    # one response per row: its labelled positions are contiguous (the fakes continue one prompt)
    pos = torch.arange(ids.shape[1])
    first = torch.where(resp, pos, ids.shape[1]).amin(1)
    last = torch.where(resp, pos, -1).amax(1)
    if (resp.sum(1) != last - first + 1).any():
        raise ValueError(
            "HFCausalLM: labels must be one contiguous response per row (prompt, then response); "
            "multi-turn rows with several labelled spans are not supported"
        )
    return torch.stack([ids, labels, mask], 1)


def unpack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, 3, L] -> (input_ids, labels, attention_mask), each [B, L] int64."""
    if x.dim() != 3 or x.shape[1] != 3:
        raise ValueError(
            f"HFCausalLM: samples must be packed [B, 3, L] (HFCausalLM.prepare_data), got "
            f"{list(x.shape)}"
        )
    x = x.long()
    return x[:, 0], x[:, 1], x[:, 2]


def right_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Packed rows [B, 3, L] widened to ``width`` with padding (id 0, label -100, mask 0)."""
    extra = width - x.shape[-1]
    if extra <= 0:
        return x
    pad = x.new_zeros(x.shape[0], 3, extra)
    pad[:, 1] = IGNORE
    return torch.cat([x, pad], -1)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets_i = labels_{i+1} (HF: logits at i predict token i + 1), -100 at the last
    position; keeps the logits / hidden states [B, L, ...] unsliced (no copy)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], 1)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """position_ids = cumsum(mask) - 1 (0 on padding): a left- or right-padded row gets the
    positions of its unpadded self."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def prompts_of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt of each packed row (kept tokens before its first response token),
    left-padded for ``generate``: (ids [N, P], mask [N, P])."""
    ids, labels, mask = unpack(x)
    first = (labels != IGNORE).long().argmax(1)  # every row has one (pack checks)
    keep = (mask == 1) & (torch.arange(ids.shape[1]) < first[:, None])
    # a stable sort on keep moves each row's prompt tokens, in order, to its right end
    order = torch.sort(keep.int(), dim=1, stable=True).indices
    width = int(keep.sum(1).max())
    out_mask = keep.gather(1, order)[:, -width:].long()
    return ids.gather(1, order)[:, -width:] * out_mask, out_mask


def _head_mismatch(out: Any, head: nn.Linear) -> str | None:
    """None when the model's last-position logits equal head(hidden_states[-1]) (fp32:
    rtol 1e-5, atol 1e-6 * max |logit|; bf16/fp16: 1e-2), else why not."""
    with torch.no_grad():
        h = out.hidden_states[-1][:, -1]
        want = F.linear(h, head.weight, head.bias).float()
        got = out.logits[:, -1].float()
        if got.shape != want.shape:
            return f"its logits {list(got.shape)} are not head(hidden_states[-1])"
        tight = h.dtype in (torch.float32, torch.float64)
        rtol, atol = (1e-5, 1e-6) if tight else (1e-2, 1e-2)
        scale = float(want.abs().max().clamp_min(1))
        # equal_nan: a NaN pad position (some eager attentions) is NaN in both
        if torch.allclose(got, want, rtol=rtol, atol=atol * scale, equal_nan=True):
            return None
        err = float((got - want).abs().max())
    return f"its logits differ from head(hidden_states[-1]) by {err:.2e} (a logit transform)"


@dataclass
class HFCausalLM(Adapter):
    """DDO for a ``transformers`` causal LM called as ``model(input_ids, attention_mask=...,
    position_ids=...)`` with ``.logits`` [B, L, V] (logits at i predict token i + 1).

    r_b = sum over response tokens of log p_theta - log p_ref (module docstring), from one
    forward of theta and one no_grad forward of ref over the [real; fake] rows. With
    ``fused=None`` (auto) the loss is :func:`~ddo_fast.fused_linear_ar_ddo_loss` on the final
    hidden states (``output_hidden_states=True, logits_to_keep=1``: the model's forward, so DDP
    and FSDP wrappers see it) and ``model.get_output_embeddings()``'s weight/bias, when that is
    an ``nn.Linear``, ``forward`` takes ``logits_to_keep`` and the config has no logit
    transform (soft-capping, logit scale); else :func:`~ddo_fast.ar_ddo_loss` on the logits.

    Fakes (:meth:`sample`): ``model.generate`` (KV cache) on each prompt, left-padded, with an
    explicit ``GenerationConfig`` (:meth:`generation_config`: nothing inherited from the
    checkpoint's generation_config such as a repetition penalty) of ``max_new_tokens`` (0: the
    longest response in the latest :meth:`prepare_data` data), ``temperature`` (0: greedy) and
    ``top_p``; the continuation is labelled up to and including the first EOS
    (``eos_token_id``, default the model's generation config) and padded with
    ``pad_token_id`` (default: generation config, config, then EOS) after it.

    The prompts for sampling come from the data given to :meth:`prepare_data`; the adapter
    keeps them (``prompts``). Reference log-probs depend on the sample only, so
    :meth:`ref_logprob` lets the loop score the round's samples once.
    """

    max_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    pad_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    fused: bool | None = None
    sample_batch: int = 256
    backend: str | None = None
    prompts: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    prompt_digest: str = field(default="", repr=False)
    data_max_new_tokens: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"HFCausalLM: max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"HFCausalLM: temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"HFCausalLM: top_p={self.top_p} must be in (0, 1]")

    # ------------------------------------------------------------------------------ data
    def prepare_data(self, data: Any) -> Batch:
        """HF-convention data (dict of [N, L] tensors, or a sequence/Dataset of dicts) ->
        (x [N, 3, L], prompt index [N]) for :func:`ddo_fast.train`; keeps the prompts for
        :meth:`sample`. Prompt indices are a fixed permutation of 0..N-1, so a fake pool
        smaller than N (balanced labels 0..n-1) still covers prompts spread over the data."""
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
            x, index = data  # already packed
            unpack(x)
        else:
            x = pack(data)
            index = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        order = torch.argsort(index)
        self.prompts = prompts_of(x[order])  # row k: the prompt whose index is k
        digest = hashlib.sha256(self.prompts[0].numpy().tobytes())
        self.prompt_digest = digest.update(self.prompts[1].numpy().tobytes()) or digest.hexdigest()
        # per call: reusing the adapter on other data must not keep the old data's length
        self.data_max_new_tokens = int((x[:, 1] != IGNORE).sum(1).max())
        return x, index

    # ----------------------------------------------------------------------- the model
    @staticmethod
    def fused_blocker(model: nn.Module) -> str | None:
        """Why the fused path cannot serve ``model`` from its structure alone (None: it may):
        no ``nn.Linear`` output embedding, no ``logits_to_keep`` in ``forward``, or a known
        logit-transform field (soft-capping, logit scale/multiplier) on the config or its
        ``text_config``."""
        inner = getattr(model, "module", model)  # DDP / FSDP wrappers
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        if not isinstance(head, nn.Linear):
            return f"the output embedding is {type(head).__name__}, not nn.Linear"
        if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
            return f"{type(inner).__name__}.forward takes no logits_to_keep"
        cfg = getattr(inner, "config", None)
        cfgs = [cfg, getattr(cfg, "text_config", None)]
        if hasattr(cfg, "get_text_config"):
            cfgs.append(cfg.get_text_config())
        for c in (c for c in cfgs if c is not None):
            for k in _LOGIT_TRANSFORMS:
                if getattr(c, k, None) not in (None, 1, 1.0):
                    return f"its config sets {k}={getattr(c, k)!r} (logits are transformed)"
        return None

    def use_fused(self, model: nn.Module) -> bool:
        """Whether :meth:`forward` will try the fused path: ``fused`` when set, else no
        structural blocker and no failed numeric check (:meth:`forward`) for this model."""
        if self.fused is not None:
            return self.fused
        inner = getattr(model, "module", model)
        return self.fused_blocker(model) is None and _HEAD_CHECK.get(inner) is None

    def forward(self, model: nn.Module, x: torch.Tensor):
        """(hidden [B, L, H], head) on the fused path, else (logits [B, L, V], None).

        The fused path is checked once per model (cached by weak reference) by a no_grad
        forward of one row with ``logits_to_keep=1``: its last position's logits must equal
        ``F.linear(hidden_states[-1][:, -1], W, b)``; a model that transforms its logits after
        the head (soft-capping, scales, multipliers under any config name) fails it. Then auto
        mode falls back to the logits path and ``fused=True`` raises ValueError."""
        ids, _, mask = unpack(x)
        kw = dict(attention_mask=mask, position_ids=positions(mask), use_cache=False)
        inner = getattr(model, "module", model)
        if self.use_fused(model):
            why = self.fused_blocker(model)
            head = inner.get_output_embeddings() if why is None else None
            if why is None and inner not in _HEAD_CHECK:
                # a no_grad probe on one row: DDP/FSDP never see two grad forwards in a step
                one = dict(attention_mask=mask[:1], position_ids=positions(mask[:1]))
                with torch.no_grad():
                    probe = model(
                        ids[:1], output_hidden_states=True, logits_to_keep=1, use_cache=False, **one
                    )
                _HEAD_CHECK[inner] = _head_mismatch(probe, head)
            why = why or _HEAD_CHECK[inner]
            if why is None:
                out = model(ids, output_hidden_states=True, logits_to_keep=1, **kw)
                return out.hidden_states[-1], head
            if self.fused:
                raise ValueError(f"HFCausalLM: fused=True but {why}; use fused=None or False")
        return model(ids, **kw).logits, None

    def sequence_logprob(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """sum over response tokens of log p_model [B] fp32 (differentiable)."""
        z, head = self.forward(model, x)
        targets = shifted_targets(unpack(x)[1])
        if head is not None:
            return fused_linear_sequence_logprob(
                z, head.weight, targets, bias=head.bias, backend=self.backend
            )
        return sequence_logprob(z, targets, backend=self.backend)

    def ref_logprob(self, ref, x, labels):
        """[N, 1] log p_ref of each sample's response (no_grad)."""
        with torch.no_grad():
            return self.sequence_logprob(ref, x)[:, None]

    # ------------------------------------------------------------------------------ loss
    def loss(self, model, ref, real, fake, noise, *, alpha, beta, ref_logprob=None) -> LossOutput:
        width = max(real[0].shape[-1], fake[0].shape[-1])
        x = torch.cat([right_pad(real[0], width), right_pad(fake[0], width)]).long()
        batch = real[0].shape[0]
        if ref_logprob is None:
            ref_lp = self.ref_logprob(ref, x, None)[:, 0]
        elif ref_logprob.shape != (2 * batch, 1):
            raise ValueError(
                f"ref_logprob: expected [{2 * batch}, 1] (the [real; fake] rows of "
                f"HFCausalLM.ref_logprob), got {list(ref_logprob.shape)}"
            )
        else:
            ref_lp = ref_logprob[:, 0]
        targets = shifted_targets(unpack(x)[1])
        z, head = self.forward(model, x)
        common = dict(alpha=alpha, beta=beta, return_logratio=True, backend=self.backend)
        is_real = pair_mask(batch, x.device)
        if head is not None:
            loss, r = fused_linear_ar_ddo_loss(
                z, head.weight, targets, ref_lp, is_real, bias=head.bias, **common
            )
        else:
            loss, r = ar_ddo_loss(z, targets, ref_lp, is_real, **common)
        return LossOutput(loss, r.detach())

    def mle_loss(self, model, real, noise) -> torch.Tensor:
        """Mean negative log-likelihood per response token of the real rows (HF's causal-LM
        cross-entropy with labels -100 on prompt and padding), fp32."""
        x = real[0].long()
        total = self.sequence_logprob(model, x).sum()
        count = (unpack(x)[1][:, 1:] != IGNORE).sum().clamp_min(1)
        return -total / count

    # ---------------------------------------------------------------------------- sample
    def token_ids(self, model: nn.Module) -> tuple[int, list[int]]:
        """(pad id, EOS ids) from the adapter, else the model's generation config / config."""
        gen = getattr(model, "generation_config", None)
        cfg = getattr(model, "config", None)

        def first(*values):
            return next((v for v in values if v is not None), None)

        eos = first(self.eos_token_id, getattr(gen, "eos_token_id", None))
        eos = first(eos, getattr(cfg, "eos_token_id", None))
        eos_list = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = first(self.pad_token_id, getattr(gen, "pad_token_id", None))
        pad = first(pad, getattr(cfg, "pad_token_id", None), eos_list[0] if eos_list else 0)
        return int(pad[0] if isinstance(pad, (list, tuple)) else pad), eos_list

    @property
    def budget(self) -> int:
        """Tokens generated per fake: ``max_new_tokens``, or (0) the longest response in the
        data of the latest :meth:`prepare_data` call."""
        return self.max_new_tokens or self.data_max_new_tokens

    def generation_config(self, pad: int, eos: list[int], temperature: float) -> Any:
        """The explicit ``GenerationConfig`` of the fakes: plain sampling at ``temperature``
        with ``top_p`` (top_k=0), or greedy; exactly ``budget`` new tokens at most, stopping at
        EOS. ``generate`` fills fields left None from the checkpoint's generation_config, so
        every logits processor a checkpoint may turn on (repetition / n-gram penalties,
        typical_p, min_p, epsilon/eta cut-offs, beams, min length) is set to "off" here: the
        fakes must be samples of p_ref itself, as r assumes."""
        from transformers import GenerationConfig

        sample = temperature > 0
        return GenerationConfig(
            do_sample=sample,
            temperature=temperature if sample else 1.0,
            top_p=self.top_p if sample else 1.0,
            top_k=0,
            min_p=0.0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            repetition_penalty=1.0,
            encoder_repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            num_beams=1,
            num_return_sequences=1,
            max_new_tokens=self.budget,
            min_new_tokens=0,
            min_length=0,
            pad_token_id=pad,
            eos_token_id=eos or None,
            use_cache=True,
        )

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompt: torch.Tensor,
        prompt_mask: torch.Tensor,
        generator: torch.Generator,
        *,
        temperature: float | None = None,
    ) -> torch.Tensor:
        """Packed samples [n, 3, P + T] (T = ``max_new_tokens``): left-padded prompts
        [n, P] (labels -100) and the model's continuations, labelled up to and including the
        first EOS; the sampling noise is seeded from ``generator`` (CPU)."""
        temperature = self.temperature if temperature is None else temperature
        budget = self.budget
        if budget < 1:
            raise ValueError("HFCausalLM: max_new_tokens is 0; call prepare_data or set it")
        device = next(model.parameters()).device
        pad, eos = self.token_ids(model)
        n, width = prompt.shape
        seed = int(torch.randint(2**62, (1,), generator=generator))
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # generate draws from the global RNG
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=prompt.to(device),
                attention_mask=prompt_mask.to(device),
                generation_config=self.generation_config(pad, eos, temperature),
            ).cpu()
        cont = out[:, width:]
        cont = torch.cat([cont, cont.new_full((n, budget - cont.shape[1]), pad)], 1)
        kept = torch.ones_like(cont, dtype=torch.bool)
        if eos:
            is_eos = torch.isin(cont, torch.tensor(eos))
            before = is_eos.long().cumsum(1) - is_eos.long()  # EOS seen strictly before i
            kept = before == 0
        cont = torch.where(kept, cont, pad)
        ids = torch.cat([prompt, cont], 1)
        labels = torch.cat([torch.full_like(prompt, IGNORE), torch.where(kept, cont, IGNORE)], 1)
        mask = torch.cat([prompt_mask, kept.long()], 1)
        return torch.stack([ids, labels, mask], 1)

    @torch.no_grad()
    def sample(self, model, n, labels, generator, device, shape):
        """The reference's continuations of the prompts whose indices are ``labels`` [n]
        (from :meth:`prepare_data`), packed [n, 3, P + max_new_tokens] on the CPU."""
        if self.prompts is None:
            raise RuntimeError(
                "HFCausalLM.sample: no prompts; pass the data through prepare_data first "
                "(ddo_fast.train does)"
            )
        if labels is None:
            raise ValueError("HFCausalLM.sample needs labels (prompt indices from prepare_data)")
        ids, mask = self.prompts
        out = []
        for start in range(0, n, self.sample_batch):
            idx = labels[start : start + self.sample_batch].cpu().long()
            p, m = ids[idx], mask[idx]
            drop = int((m.sum(0) == 0).sum())  # all-padding columns of this chunk
            out.append(self.generate(model, p[:, drop:], m[:, drop:], generator))
        width = max(o.shape[-1] for o in out)
        return torch.cat([right_pad(o, width) for o in out])

    def sampler_config(self):
        return {
            "kind": "hf-generate",
            "max_new_tokens": self.budget,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "prompts": self.prompt_digest,  # the fakes continue these prompts
        }
