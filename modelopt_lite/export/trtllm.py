"""TensorRT-LLM checkpoint writer for Llama-family decoders (Llama, Mistral, Qwen2) and GPT-2.

    export_tensorrt_llm_checkpoint(model, export_dir="out/llama-fp8", inference_tensor_parallel=2)

Writes ``config.json`` (one for all ranks) and ``rank{r}.safetensors`` for
each tensor-parallel rank, with TensorRT-LLM's names: q/k/v fused into
``attention.qkv``, ``mlp.fc`` (from gate_proj), ``mlp.gate`` (from up_proj),
``mlp.proj``. The caller's model is only read: one decoder layer at a time
is converted, split for the ranks and appended to every rank's file, so
extra memory is about one layer. Everything is written into a temporary
directory beside the target and renamed at the end. Names, dtypes, split
rules: ../shared/specs/CHECKPOINTS.md part B.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from ..quantization.tensor_quantizer import TensorQuantizer
from ..utils.fs import atomic_directory
from .hf import PRODUCER
from .layers import ExportError, GroupValues, export_linear, float_weight, kv_scale
from .plan import ExportPlan, plan_export
from .safetensors_io import ShardedSafetensorsWriter
from .trtllm_split import COLUMN, REPLICATED, ROW, VOCAB, Split, check_heads, qkv_split, split_tensor

__all__ = ["export_tensorrt_llm_checkpoint", "TRTLLM_ALGOS", "QUANT_CONFIG_KEYS", "DECODERS"]

TRTLLM_ALGOS = ("FP8", "NVFP4", "W4A16_AWQ", "W4A8_AWQ", "W8A8_SQ_PER_CHANNEL")
"""quant_algo values this writer produces (besides unquantized)."""

QUANT_CONFIG_KEYS = frozenset({"quant_algo", "kv_cache_quant_algo", "group_size", "smoothquant_val", "clamp_val",
                               "use_meta_recipe", "has_zero_point", "pre_quant_scale", "exclude_modules"})
"""Keys TensorRT-LLM's QuantConfig accepts; the `quantization` block uses no others."""

_AWQ = ("W4A16_AWQ", "W4A8_AWQ")
_NOT_IN_TRTLLM = {
    "W8A16": "TensorRT-LLM expects INT8 weight-only weights either in high precision (it quantizes them itself) "
             "or already interleaved for its mixed GEMM kernel",
    "W4A16_NVFP4": "W4A16_NVFP4 is not a TensorRT-LLM QuantAlgo",
    "W4A8_NVFP4_FP8": "this writer does not produce W4A8_NVFP4_FP8 for TensorRT-LLM",
    "FP8_PER_CHANNEL_PER_TOKEN": "this writer does not produce FP8_PER_CHANNEL_PER_TOKEN for TensorRT-LLM",
}
_RENAME = {"weight_scale": "weights_scaling_factor", "weight_scale_2": "weights_scaling_factor_2",
           "input_scale": "activation_scaling_factor", "pre_quant_scale": "prequant_scaling_factor"}
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NO_SHARDING = 1 << 62


@dataclass(frozen=True)
class _Family:
    architecture: str
    layers: str  # HF module list of decoder layers
    embed: str
    pos_embed: Optional[str]
    final_norm: str
    norms: Tuple[Tuple[str, str], ...]  # (TRT-LLM name, HF name) inside a layer
    linears: Tuple[Tuple[str, Tuple[str, ...], str], ...]  # (TRT-LLM name, HF members, split kind)
    attention: Optional[str]  # attention module inside a layer (holds the KV-cache quantizers)


_LLAMA = dict(
    layers="model.layers", embed="model.embed_tokens", pos_embed=None, final_norm="model.norm",
    norms=(("input_layernorm", "input_layernorm"), ("post_layernorm", "post_attention_layernorm")),
    linears=(("attention.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv"),
             ("attention.dense", ("self_attn.o_proj",), "row"),
             ("mlp.fc", ("mlp.gate_proj",), "col"),  # TRT-LLM's GatedMLP: proj(act(fc(x)) * gate(x))
             ("mlp.gate", ("mlp.up_proj",), "col"),
             ("mlp.proj", ("mlp.down_proj",), "row")),
    attention="self_attn")

DECODERS: Dict[str, _Family] = {
    "llama": _Family("LlamaForCausalLM", **_LLAMA),
    "mistral": _Family("MistralForCausalLM", **_LLAMA),
    "qwen2": _Family("Qwen2ForCausalLM", **_LLAMA),
    "gpt2": _Family(
        "GPT2LMHeadModel", layers="transformer.h", embed="transformer.wte", pos_embed="transformer.wpe",
        final_norm="transformer.ln_f", norms=(("input_layernorm", "ln_1"), ("post_layernorm", "ln_2")),
        linears=(("attention.qkv", ("attn.c_attn",), "qkv"), ("attention.dense", ("attn.c_proj",), "row"),
                 ("mlp.fc", ("mlp.c_fc",), "col"), ("mlp.proj", ("mlp.c_proj",), "row")),
        attention=None),
}
_ALIASES = {"gpt": "gpt2"}


@dataclass(frozen=True)
class _Dims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_size: int
    intermediate: int
    vocab: int
    positions: int


def _dims(cfg, decoder: str) -> _Dims:
    if decoder == "gpt2":
        h, nh = cfg.n_embd, cfg.n_head
        return _Dims(cfg.n_layer, h, nh, nh, h // nh, cfg.n_inner or 4 * h, cfg.vocab_size, cfg.n_positions)
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    return _Dims(cfg.num_hidden_layers, h, nh, getattr(cfg, "num_key_value_heads", None) or nh,
                 getattr(cfg, "head_dim", None) or h // nh, cfg.intermediate_size, cfg.vocab_size,
                 cfg.max_position_embeddings)


def _cat(ts: List[torch.Tensor]) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts)


class _Writer:
    """Converts the model into TRT-LLM tensors, one layer at a time, and appends every rank's slice."""

    def __init__(self, model: nn.Module, decoder: str, plan: ExportPlan, tp: int, dtype: torch.dtype):
        self.model, self.decoder, self.plan, self.tp, self.dtype = model, decoder, plan, tp, dtype
        self.family = DECODERS[decoder]
        try:
            self.dims = _dims(model.config, decoder)
        except AttributeError as e:
            raise ExportError(f"the model's config is not a {decoder} config ({e}); pass decoder_type") from None
        self.group_of = {n: g for g in plan.groups for n in g}

    # ---- checks (before anything is written) --------------------------------------------------
    def layer_linears(self, i: int) -> Iterator[Tuple[str, List[str], str]]:
        base = f"{self.family.layers}.{i}"
        for trt, hf, kind in self.family.linears:
            yield f"transformer.layers.{i}.{trt}", [f"{base}.{h}" for h in hf], kind

    def validate(self) -> None:
        d, tp, plan, model = self.dims, self.tp, self.plan, self.model
        check_heads(d.heads, d.kv_heads, tp)
        if d.intermediate % tp:
            raise ExportError(f"intermediate size {d.intermediate} cannot be split over {tp} tensor-parallel ranks")
        algo = plan.quant_algo
        if algo == "MIXED_PRECISION":
            raise ExportError(f"the layers use several formats ({sorted(set(plan.algos.values()))}); the "
                              "TensorRT-LLM export writes one quant_algo: quantize all layers in one format")
        if algo in _NOT_IN_TRTLLM:
            raise ExportError(f"{algo}: {_NOT_IN_TRTLLM[algo]}. TensorRT-LLM export supports: "
                              f"unquantized, {', '.join(TRTLLM_ALGOS)} (use export_hf_checkpoint for {algo})")
        if algo is not None and algo not in TRTLLM_ALGOS:
            raise ExportError(f"unknown quant_algo {algo!r} for the TensorRT-LLM export")
        if plan.kv_algo not in (None, "FP8"):
            raise ExportError(f"KV-cache format {plan.kv_algo}: the TensorRT-LLM export writes FP8 KV-cache "
                              "scales only")
        covered = set()
        for i in range(d.layers):
            for trt, names, kind in self.layer_linears(i):
                mods = []
                for n in names:
                    try:
                        mods.append(model.get_submodule(n))
                    except AttributeError:
                        raise ExportError(f"the model has no module {n!r}; is it a {self.decoder} model? "
                                          f"(pass decoder_type)") from None
                covered.update(names)
                algos = {plan.algos.get(n) for n in names}
                if len(algos) > 1:
                    raise ExportError(f"{trt}: {names} are fused into one TensorRT-LLM GEMM but are not quantized "
                                      "alike; quantize all of them or none")
                self._check_split(trt, mods[0], algos.pop(), kind)
        extra = sorted(set(plan.algos) - covered)
        if extra:
            raise ExportError(f"quantized layers {extra} have no quantized form in the TensorRT-LLM checkpoint "
                              "(embeddings and lm_head stay in high precision); disable their quantizers")
        if plan.kv_algo:
            wanted = {f"{self.family.layers}.{i}.{self.family.attention}" for i in range(d.layers)}
            if self.family.attention is None or set(plan.kv) != wanted:
                raise ExportError(f"KV-cache quantizers found on {sorted(plan.kv)}; the TensorRT-LLM export needs "
                                  f"them on every attention layer ({self.family.layers}.*.{self.family.attention})")

    def _check_split(self, trt: str, m: nn.Module, algo: Optional[str], kind: str) -> None:
        out_f, in_f = float_weight(m).shape
        rank_in = in_f // self.tp if kind == "row" else in_f
        if kind == "row" and in_f % self.tp:
            raise ExportError(f"{trt}: {in_f} input features cannot be split over {self.tp} ranks")
        if algo == "NVFP4" and rank_in % 16:
            raise ExportError(f"{trt}: NVFP4 needs a multiple of 16 input features per rank, got {rank_in} "
                              f"at tensor-parallel size {self.tp}")
        if algo in _AWQ:
            g = int(m.weight_quantizer.fmt.blocks[-1])
            if rank_in % g:
                raise ExportError(f"{trt}: INT4 AWQ needs a multiple of the group size {g} input features per "
                                  f"rank, got {rank_in} at tensor-parallel size {self.tp}")
            if self.dims.head_size % 2 or (kind == "col" and (out_f // self.tp) % 2):
                raise ExportError(f"{trt}: INT4 weights pack two output rows per byte; the rows per rank and per "
                                  "head must be even")

    # ---- config ------------------------------------------------------------------------------
    def quantization(self) -> Dict:
        plan = self.plan
        algo = plan.quant_algo
        q: Dict = {"quant_algo": algo, "kv_cache_quant_algo": plan.kv_algo}
        if algo == "NVFP4":
            q["group_size"] = 16
        elif algo in _AWQ:
            sizes = {int(self.model.get_submodule(n).weight_quantizer.fmt.blocks[-1]) for n in plan.algos}
            if len(sizes) != 1:
                raise ExportError(f"INT4 AWQ layers use several group sizes {sorted(sizes)}; TensorRT-LLM takes one")
            q.update(group_size=sizes.pop(), has_zero_point=False, pre_quant_scale=True)
        if algo is not None:
            excluded = [trt for i in range(self.dims.layers) for trt, names, _ in self.layer_linears(i)
                        if names[0] not in plan.algos]
            q["exclude_modules"] = ["lm_head"] + excluded
        return q

    def config(self) -> Dict:
        cfg, d, name = self.model.config, self.dims, _DTYPES[self.dtype]
        out = {
            "architecture": self.family.architecture, "dtype": name,
            "logits_dtype": "float16" if name == "bfloat16" else name,
            "num_hidden_layers": d.layers, "num_attention_heads": d.heads, "num_key_value_heads": d.kv_heads,
            "hidden_size": d.hidden, "intermediate_size": d.intermediate, "vocab_size": d.vocab,
            "max_position_embeddings": d.positions, "head_size": d.head_size,
            "use_parallel_embedding": True, "embedding_sharding_dim": 0, "share_embedding_table": False,
            "mapping": {"world_size": self.tp, "tp_size": self.tp, "pp_size": 1},
            "quantization": self.quantization(), "producer": dict(PRODUCER), "decoder": self.decoder,
        }
        if self.decoder == "gpt2":
            out.update(hidden_act=cfg.activation_function, norm_epsilon=cfg.layer_norm_epsilon,
                       position_embedding_type="learned_absolute", gpt_variant="gpt2", bias=True)
            return out
        first = self.model.get_submodule(f"{self.family.layers}.0")
        out.update(hidden_act=cfg.hidden_act, norm_epsilon=cfg.rms_norm_eps, position_embedding_type="rope_gpt_neox",
                   attn_bias=first.self_attn.q_proj.bias is not None,
                   mlp_bias=first.mlp.gate_proj.bias is not None, **_rope(cfg))
        if self.decoder == "qwen2":
            out.update(qwen_type="qwen2", seq_length=d.positions)
        return out

    # ---- tensors -----------------------------------------------------------------------------
    def tensors(self) -> Iterator[Tuple[str, torch.Tensor, Split]]:
        """(name, unsplit tensor, split rule) in checkpoint order; each layer is computed when reached."""
        fam, dtype = self.family, self.dtype
        yield "transformer.vocab_embedding.weight", self._float(fam.embed), VOCAB
        if fam.pos_embed:
            yield "transformer.position_embedding.weight", self._float(fam.pos_embed), VOCAB
        for i in range(self.dims.layers):
            base = f"{fam.layers}.{i}"
            for trt, hf in fam.norms:
                yield from self._norm(f"{base}.{hf}", f"transformer.layers.{i}.{trt}")
            for trt, names, kind in self.layer_linears(i):
                rule = qkv_split(self.dims.heads, self.dims.kv_heads) if kind == "qkv" else (
                    COLUMN if kind == "col" else ROW)
                algo, tensors = self._linear(names)
                for suffix, t in tensors.items():
                    yield f"{trt}.{suffix}", t, _rule(suffix, algo, rule)
            if self.plan.kv_algo:
                yield from self._kv(f"{base}.{fam.attention}", f"transformer.layers.{i}.attention")
        yield from self._norm(fam.final_norm, "transformer.ln_f")
        head = self.model.get_submodule("lm_head")
        yield "lm_head.weight", head.weight.detach().to(dtype), VOCAB

    def _float(self, name: str) -> torch.Tensor:
        return self.model.get_submodule(name).weight.detach().to(self.dtype)

    def _norm(self, hf: str, trt: str):
        m = self.model.get_submodule(hf)
        yield f"{trt}.weight", m.weight.detach().to(self.dtype), REPLICATED
        if getattr(m, "bias", None) is not None:
            yield f"{trt}.bias", m.bias.detach().to(self.dtype), REPLICATED

    def _shared(self, name: str, algo: str) -> Optional[GroupValues]:
        gv = self.plan.shared.get(name)
        group = self.group_of.get(name)
        if algo != "FP8" or not group:
            return gv
        # One FP8 weight scale per fused GEMM (q/k/v; fc/gate too, as ModelOpt writes): quantize every
        # member with the group's largest amax (equal to its own when quantize() unified them).
        amaxes = [_fp8_weight_amax(self.model.get_submodule(n)) for n in group]
        top = torch.stack([a.reshape(()) for a in amaxes]).amax()
        return dataclasses.replace(gv or GroupValues(), weight_amax=top)

    def _linear(self, names: List[str]) -> Tuple[Optional[str], Dict[str, torch.Tensor]]:
        mods = [self.model.get_submodule(n) for n in names]
        algo = self.plan.algos.get(names[0])
        if algo is None:
            tensors = {"weight": _cat([float_weight(m).to(self.dtype) for m in mods])}
        else:
            parts = [export_linear(m, algo, self._shared(n, algo), self.dtype) for n, m in zip(names, mods)]
            tensors = _fuse(parts, algo, names, self.dtype)
        biases = [getattr(m, "bias", None) for m in mods]
        if any(b is not None for b in biases):
            tensors["bias"] = _cat([b.detach().to(self.dtype) if b is not None else
                                    torch.zeros(float_weight(m).shape[0], dtype=self.dtype)
                                    for b, m in zip(biases, mods)])
        return algo, tensors

    def _kv(self, attn: str, trt: str):
        qs = self.plan.kv[attn]
        # ModelOpt's TRT-LLM convention for FP8: max(amax / 448, 1.0) (CHECKPOINTS.md 1.8)
        k, v = (torch.clamp(kv_scale(qs[r]), min=1.0).reshape(1) for r in ("k", "v"))
        yield f"{trt}.kv_cache_scaling_factor", torch.maximum(k, v), REPLICATED
        yield f"{trt}.k_cache_scaling_factor", k, REPLICATED
        yield f"{trt}.v_cache_scaling_factor", v, REPLICATED


def _rope(cfg) -> Dict:
    params = getattr(cfg, "rope_parameters", None)
    params = dict(params) if isinstance(params, dict) else {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    out = {"rotary_base": float(theta) if theta is not None else 10000.0, "rotary_pct": 1.0}
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind not in (None, "default"):
        params.pop("rope_theta", None)
        out["rotary_scaling"] = {"type": kind, **params}
    return out


def _fp8_weight_amax(m: nn.Module) -> torch.Tensor:
    q = m.weight_quantizer
    amax = q.amax if q.amax is not None else float_weight(m).abs().amax()
    return amax.detach().float().amax()


def _fuse(parts: List[Dict[str, torch.Tensor]], algo: str, names: List[str], dtype: torch.dtype):
    """HF-suffix tensors of a fused group's members -> one TRT-LLM linear (rows concatenated in order)."""

    def same(key: str) -> torch.Tensor:
        first = parts[0][key]
        if any(not torch.equal(p[key], first) for p in parts[1:]):
            raise ExportError(f"{names}: {key} differs between layers that TensorRT-LLM runs as one GEMM")
        return first

    scalar = () if algo == "NVFP4" else (1,)
    w = _cat([p["weight"] for p in parts])
    out = {"weight": w.view(torch.int8) if algo in _AWQ else w}  # AWQ: same bytes, int8 dtype
    if algo == "FP8":
        out["weights_scaling_factor"] = same("weight_scale").reshape(1)
    else:
        out["weights_scaling_factor"] = _cat([p["weight_scale"] for p in parts])
    for key in ("weight_scale_2", "input_scale"):
        if key in parts[0]:
            out[_RENAME[key]] = same(key).reshape(scalar)
    if "pre_quant_scale" in parts[0]:
        out["prequant_scaling_factor"] = same("pre_quant_scale")
    elif algo in _AWQ:  # TRT-LLM's AWQ layers always apply a prequant_scaling_factor
        out["prequant_scaling_factor"] = torch.ones(w.shape[1], dtype=dtype)
    return out


def _rule(suffix: str, algo: Optional[str], rule: Split) -> Split:
    """How one tensor of a linear layer is split, given the layer's split (CHECKPOINTS.md 3.5)."""
    if suffix in ("weights_scaling_factor_2", "activation_scaling_factor"):
        return REPLICATED
    if suffix == "prequant_scaling_factor":
        return ROW if rule is ROW else REPLICATED
    per_tensor = suffix == "weights_scaling_factor" and algo == "FP8"
    if rule is ROW:
        # weight and 2-d scales (NVFP4 blocks, AWQ groups) follow the input columns; bias and
        # per-output-channel scales (SmoothQuant) are replicated
        return ROW if suffix == "weight" or (suffix == "weights_scaling_factor" and algo in _AWQ + ("NVFP4",)) \
            else REPLICATED
    return REPLICATED if per_tensor else rule


def _plan(model: nn.Module) -> ExportPlan:
    if any(isinstance(q, TensorQuantizer) and q.is_enabled for q in model.modules()):
        return plan_export(model)
    return ExportPlan(algos={}, excluded=[], groups=[])


def _decoder(model: nn.Module, decoder_type: Optional[str]) -> str:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ExportError("export_tensorrt_llm_checkpoint needs a Hugging Face transformers model (with .config)")
    name = decoder_type or getattr(cfg, "model_type", None)
    name = _ALIASES.get(name, name)
    if name not in DECODERS:
        raise ExportError(f"decoder type {name!r} is not supported by the TensorRT-LLM export; "
                          f"supported: {', '.join(DECODERS)}")
    return name


def _dtype(model: nn.Module, dtype) -> torch.dtype:
    if dtype is None:
        dtype = next(model.parameters()).dtype
    if isinstance(dtype, str):
        dtype = {v: k for k, v in _DTYPES.items()}.get(dtype.replace("torch.", ""), dtype)
    if dtype not in _DTYPES:
        raise ExportError(f"dtype {dtype} is not a TensorRT-LLM checkpoint dtype; use float16, bfloat16 or float32")
    return dtype


class _RankFiles:
    """One streaming safetensors writer per rank, writing rank{r}.safetensors."""

    def __init__(self, directory: Path, tp: int):
        self.tp = tp
        self.writers = [ShardedSafetensorsWriter(directory, _NO_SHARDING, prefix=f"rank{r}") for r in range(tp)]

    def add(self, name: str, tensor: torch.Tensor, rule: Split) -> None:
        for r, w in enumerate(self.writers):
            w.add(name, split_tensor(tensor, rule, self.tp, r, name))

    def close(self) -> None:
        for w in self.writers:
            w.close()


def export_tensorrt_llm_checkpoint(
    model: nn.Module,
    decoder_type: Optional[str] = None,
    *,
    export_dir: Union[str, Path],
    inference_tensor_parallel: int = 1,
    dtype: Union[torch.dtype, str, None] = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (quantized with `quantize`, or not) as a TensorRT-LLM checkpoint.

    `decoder_type` is "llama", "mistral", "qwen2" or "gpt2" (default: the
    model's ``config.model_type``). The weights are split for
    `inference_tensor_parallel` ranks (rank{r}.safetensors each); `dtype`
    casts the unquantized tensors (default: the model's). An existing
    non-empty `export_dir` is refused unless `overwrite`. Returns the directory.
    """
    decoder = _decoder(model, decoder_type)
    tp = inference_tensor_parallel
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ExportError(f"inference_tensor_parallel must be a positive int, got {tp!r}")
    writer = _Writer(model, decoder, _plan(model), tp, _dtype(model, dtype))
    writer.validate()
    config = writer.config()
    with torch.no_grad(), atomic_directory(export_dir, overwrite=overwrite) as tmp:
        files = _RankFiles(tmp, tp)
        for name, tensor, rule in writer.tensors():
            files.add(name, tensor, rule)
        files.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(export_dir)
