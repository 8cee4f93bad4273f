"""ModelConfig: the DeepSeek-V3 architecture, with Hugging Face `DeepseekV3Config` field names.

A nanoseek checkpoint's config.json is a valid `DeepseekV3Config` (model_type "deepseek_v3"), and a
released DeepSeek config.json (V3, R1, V2-Lite, V3.2) reads into a ModelConfig. DeepSeek-V3.2 is V3
plus DeepSeek Sparse Attention (a lightning indexer per attention layer, model/attention.py): the
three `index_*` fields of HF's `DeepseekV32Config`, set, make a V3.2 model, saved as model_type
"deepseek_v32"; left unset (None) they write nothing, so a V3 or V2 config.json is unchanged.

DeepSeek-V4's manifold-constrained hyper-connections (mHC, model/hyper.py) replace the residual with
`hc_mult` streams; the field set (with `hc_sinkhorn_iters`, `hc_eps`: HF's `DeepseekV4Config` names)
makes an mHC model, saved as model_type "deepseek_v3_mhc" (architectures "DeepseekV3MHCForCausalLM").
That name is nanoseek's own on purpose: transformers has no V3-with-mHC class, and under
"deepseek_v3" it would load the checkpoint as a plain V3, drop the hyper-connection weights with a
warning and compute something else; under a model_type it does not know, AutoConfig and
AutoModelForCausalLM refuse the directory (ValueError), while nanoseek's load_model reads it. (Naming
the class, DeepseekV3ForCausalLM.from_pretrained, still builds a V3 and lists the hc weights as
UNEXPECTED in its load report.) Unset (None), the three fields write nothing.

DeepSeek-V4 (model/attention_v4.py) is the rest of V4's architecture around mHC: `layer_types` set
(one attention type per layer: sliding-window, compressed sparse or heavily compressed attention),
with `mlp_layer_types` (hash-routed or learned-router MoE) and the other fields of HF's
`DeepseekV4Config` (head_dim, compress_rates, o_groups, ...), saved as transformers' model_type
"deepseek_v4". Unset (layer_types None), those fields write nothing and must keep their defaults.

Fields keep HF's names and meanings so that nobody has to learn a second vocabulary; the few that HF
lacks (the V2 router's `scoring_func` / `topk_method`, `moe_layer_freq`) are the ones DeepSeek's own
config.json files carry.

Presets: `tiny` (unit tests), `small` (the CPU demo model), `reasoning` (the R1-Zero demo's base),
`gpu` (a one-GPU model with V3's shape ratios), `v2-lite` and `v3` (the released sizes, for counting
parameters on the meta device and for loading real checkpoints), `v4-tiny` (DeepSeek-V4 at toy size:
every attention type and both MoE types, for tests and `nanoseek pretrain preset=v4-tiny`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.errors import ConfigError


class HFConfig:
    """What both model configs do with an HF config.json (ModelConfig here, DenseConfig in
    model/dense.py): read and write the file, refuse fields they do not model, copy with changes.
    A subclass supplies from_dict / to_dict and the keys it accepts silently (_IGNORED_KEYS)."""

    _IGNORED_KEYS: frozenset[str] = frozenset()

    @classmethod
    def from_json(cls, path: str | Path):
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def check_number_fields(self) -> None:
        """A number field holding anything else (null, a string) is a ConfigError naming it, not a
        TypeError in the model's first forward. A float field takes an integer (JSON's 10000)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"invalid config field {f.name}={value!r}: must be an integer")
            if f.type in ("float", float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"invalid config field {f.name}={value!r}: must be a number")

    @classmethod
    def known_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
        """The entries of `d` that are fields; any other key not in _IGNORED_KEYS is a ConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in cls._IGNORED_KEYS)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; valid fields: {sorted(names)}")
        return {k: v for k, v in d.items() if k in names}


# transformers' DeepseekV2Config defaults where they differ from a V3 config's: what a V2 config.json
# means by leaving a routing field out (the released V2 files write them all)
DEEPSEEK_V2_DEFAULTS = dict(topk_method="greedy", scoring_func="softmax", num_nextn_predict_layers=0,
                            norm_topk_prob=False, routed_scaling_factor=1.0, first_k_dense_replace=0,
                            n_group=1, topk_group=1)
# transformers' DeepseekV32Config defaults (DeepSeek-V3.2-Exp's values) for a V3.2 file that leaves them out
DEEPSEEK_V32_DEFAULTS = dict(index_topk=2048, index_head_dim=128, index_n_heads=64)
# transformers' DeepseekV4Config defaults (DeepSeek-V4-Flash's) where they differ from a V3 config's,
# for a V4 file that leaves them out; the last five are the V3 routing features V4 does not have
DEEPSEEK_V4_DEFAULTS = dict(
    hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, num_key_value_heads=1, head_dim=512,
    q_lora_rank=1024, n_routed_experts=256, num_experts_per_tok=6, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5,
    max_position_embeddings=1048576, hc_mult=4, index_n_heads=64, index_head_dim=128, index_topk=512,
    num_nextn_predict_layers=1, first_k_dense_replace=0, n_group=1, topk_group=1, topk_method="noaux_tc",
    moe_layer_freq=1)
V4_ATTENTION_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
V4_MLP_TYPES = ("hash_moe", "moe")
# the fields only a DeepSeek-V4 config uses (config.json keys of HF's DeepseekV4Config)
V4_FIELDS = ("layer_types", "mlp_layer_types", "head_dim", "compress_rates", "compress_rope_theta",
             "sliding_window", "o_groups", "o_lora_rank", "swiglu_limit")


@dataclass
class ModelConfig(HFConfig):
    """A DeepSeek-V3 (or V2, or V3.2 with the index_* fields set) model's shape: Hugging Face
    `DeepseekV3Config`'s field names and meanings (`DeepseekV32Config`'s for index_*), defaults those
    of DeepSeek-V3 (671B). Checked as it is made (a ConfigError names the
    bad field). `from_json` / `to_json` read and write an HF config.json; `nanoseek.config.preset(name)`
    gives the named sizes (tiny, small, reasoning, gpu, v2-lite, v3)."""

    # sizes
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # FFN width of the dense layers
    moe_intermediate_size: int = 2048  # FFN width of each routed expert
    num_hidden_layers: int = 61  # main decoder layers (MTP modules are not counted)
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # MLA has per-head K/V: must equal num_attention_heads
    # DeepSeekMoE
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8  # expert groups (= nodes in training); routing is limited to topk_group of them
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3), "greedy" or "group_limited_greedy" (V2)
    first_k_dense_replace: int = 3  # layers with index < k use a dense MLP
    moe_layer_freq: int = 1  # layer i is MoE iff i >= first_k_dense_replace and i % freq == 0
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (V3 paper: 1e-4); 0 = off
    # MLA
    q_lora_rank: int | None = 1536  # None: a single uncompressed q_proj (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # positions
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True  # the released weights store rotary dims as interleaved pairs
    # DeepSeek Sparse Attention (V3.2): each query attends only to the index_topk cached tokens its
    # lightning indexer (index_n_heads heads of index_head_dim dims) scores highest. None: dense (V3)
    index_topk: int | None = None
    index_head_dim: int | None = None
    index_n_heads: int | None = None
    # Manifold-constrained hyper-connections (DeepSeek-V4, model/hyper.py): hc_mult residual streams
    # mixed per token by Sinkhorn-projected (hc_sinkhorn_iters) doubly stochastic matrices. None: V3's residual
    hc_mult: int | None = None
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # DeepSeek-V4 (model/attention_v4.py), with hc_mult and index_* set too. None: not V4 (the rest unused)
    layer_types: list | None = None  # per layer, one of V4_ATTENTION_TYPES
    mlp_layer_types: list | None = None  # per layer: "hash_moe" (tid2eid lookup on the token id) or "moe"
    head_dim: int = 512  # of the one shared K=V head and of each query head; qk_rope_head_dim of it rotate
    compress_rates: dict | None = None  # tokens per compressed entry, by attention type (V4: 4 and 128)
    compress_rope_theta: float = 160000.0  # RoPE base of the compressed layers (rope_scaling applies to it)
    sliding_window: int = 128  # every V4 attention sees the last sliding_window tokens uncompressed
    o_groups: int = 8  # grouped output projection: head groups, each projected to o_lora_rank first
    o_lora_rank: int = 1024
    swiglu_limit: float = 10.0  # experts' gate clamped to <= limit and up to [-limit, limit]
    # multi-token prediction
    num_nextn_predict_layers: int = 1
    # misc
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    torch_dtype: str = "float32"  # the dtype weights are stored in

    # ---------------------------------------------------------------- derived

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_v4(self) -> bool:
        """DeepSeek-V4's architecture (attention_v4.py, hash-routed MoE), not V3's MLA."""
        return self.layer_types is not None

    @property
    def sparse_attention(self) -> bool:
        """DeepSeek-V3.2's DSA: every attention layer (MTP's too) has an indexer (V4's CSA has its own)."""
        return self.index_topk is not None and not self.is_v4

    @property
    def yarn(self) -> dict | None:
        """The YaRN settings, or None when RoPE is unscaled."""
        rs = self.rope_scaling
        if rs and rs.get("type", rs.get("rope_type")) == "yarn":
            return rs
        return None

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 under YaRN (DeepSeek-V2 §3.1.4, HF yarn_apply_mscale)."""
        scale = self.qk_head_dim**-0.5
        yarn = self.yarn
        if yarn and yarn.get("mscale_all_dim"):
            factor = float(yarn["factor"])
            if factor > 1:
                mscale = 0.1 * float(yarn["mscale_all_dim"]) * math.log(factor) + 1.0
                scale *= mscale * mscale
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: MoE from layer first_k_dense_replace on, every moe_layer_freq layers.

        MTP modules (layer_idx >= num_hidden_layers) follow the same rule, so V3's MTP block is MoE.
        """
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    # ------------------------------------------------------------ validation

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def bad(name, why):
            raise ConfigError(f"invalid config field {name}={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        self.check_number_fields()
        if self.is_v4:
            return self.validate_v4(bad)
        for name in V4_FIELDS:  # a V4 field set on a V3 / V2 / V3.2 config would be silently unused
            if getattr(self, name) != _DEFAULTS[name]:
                bad(name, "is a DeepSeek-V4 field: set layer_types (and the other V4 fields) for a V4 model, "
                          "or leave it out")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "rotary dims come in pairs, so it must be even")
        if self.num_key_value_heads != self.num_attention_heads:
            bad("num_key_value_heads", f"MLA has one K/V per head: set it to num_attention_heads "
                                       f"({self.num_attention_heads})")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            bad("q_lora_rank", "must be a positive integer, or null for an uncompressed q_proj")
        if self.scoring_func not in ("sigmoid", "softmax"):
            bad("scoring_func", 'must be "sigmoid" (V3) or "softmax" (V2); "sqrtsoftplus" is DeepSeek-V4\'s '
                                '(set layer_types)')
        if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            bad("topk_method", 'must be "noaux_tc", "greedy" or "group_limited_greedy"')
        if self.hidden_act != "silu":
            bad("hidden_act", 'only "silu" (SwiGLU) is supported')
        if self.num_nextn_predict_layers < 0:
            bad("num_nextn_predict_layers", "must be >= 0")
        if self.moe_layer_freq < 1:
            bad("moe_layer_freq", "must be >= 1")
        if self.n_routed_experts > 0:
            E, G = self.n_routed_experts, self.n_group
            if G < 1 or E % G:
                bad("n_group", f"n_routed_experts ({E}) must split evenly into n_group groups")
            if not 1 <= self.topk_group <= G:
                bad("topk_group", f"must be between 1 and n_group ({G})")
            if self.topk_method == "noaux_tc" and E // G < 2:
                bad("n_group", "each group needs >= 2 experts: a group's score is its top-2 sum")
            if not 1 <= self.num_experts_per_tok <= self.topk_group * (E // G):
                bad("num_experts_per_tok", f"must be between 1 and topk_group * experts per group "
                                           f"({self.topk_group * (E // G)})")
        self.validate_sparse_attention(bad)
        if self.hc_mult is not None:
            if isinstance(self.hc_mult, bool) or not isinstance(self.hc_mult, int) or self.hc_mult < 1:
                bad("hc_mult", "the number of mHC residual streams must be a positive integer (V4: 4), "
                               "or null for the plain residual")
            if self.hc_sinkhorn_iters < 1:
                bad("hc_sinkhorn_iters", "Sinkhorn needs at least one iteration (V4: 20)")
            if not self.hc_eps > 0:
                bad("hc_eps", "must be a small positive number (V4: 1e-6)")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("type", rs.get("rope_type"))
            if kind not in ("yarn", "default", None):
                bad("rope_scaling", f'only YaRN scaling is supported, got type "{kind}"')
            if kind == "yarn" and ("factor" not in rs or "original_max_position_embeddings" not in rs):
                bad("rope_scaling", "YaRN needs factor and original_max_position_embeddings")

    def validate_v4(self, bad) -> None:
        """DeepSeek-V4's combinations: transformers' DeepseekV4Config, and what nanoseek models of it."""
        n = self.num_hidden_layers
        for name, allowed in (("layer_types", V4_ATTENTION_TYPES), ("mlp_layer_types", V4_MLP_TYPES)):
            types = getattr(self, name)
            if not isinstance(types, list) or len(types) != n or any(t not in allowed for t in types):
                bad(name, f"DeepSeek-V4 needs one entry per layer ({n}), each one of {list(allowed)}")
        fixed = dict(num_key_value_heads=(1, "V4's attention is shared-KV MQA: one K=V head"),
                     first_k_dense_replace=(0, "every V4 layer is MoE"), moe_layer_freq=(1, "every V4 layer is MoE"),
                     n_group=(1, "V4 routes without expert groups"), topk_group=(1, "V4 routes without expert groups"),
                     topk_method=("noaux_tc", "V4 routes by the biased top-k (noaux_tc)"),
                     norm_topk_prob=(True, "V4's router always normalises the top-k weights"),
                     n_shared_experts=(1, "V4 has one shared expert of moe_intermediate_size"),
                     attention_bias=(False, "V4's projections have no bias"),
                     num_nextn_predict_layers=(0, "nanoseek has no DeepSeek-V4 MTP module (transformers drops "
                                                  "V4's MTP weights too): train V4 without MTP"))
        for name, (value, why) in fixed.items():
            if getattr(self, name) != value:
                bad(name, f"must be {value!r} for DeepSeek-V4: {why}")
        if self.scoring_func not in ("sqrtsoftplus", "sigmoid", "softmax"):
            bad("scoring_func", 'must be "sqrtsoftplus" (V4), "sigmoid" or "softmax"')
        if self.hc_mult is None:
            bad("hc_mult", "DeepSeek-V4 always has mHC residual streams: set hc_mult (V4: 4)")
        if self.q_lora_rank is None:
            bad("q_lora_rank", "V4's queries (and its indexer's) come from a compressed latent: set q_lora_rank")
        for name in ("head_dim", "sliding_window", "o_groups", "o_lora_rank", "n_routed_experts"):
            if getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            bad("qk_rope_head_dim", f"the rotary dims are the last of head_dim ({self.head_dim}), in pairs: "
                                    "an even number at most head_dim")
        if self.num_attention_heads * self.head_dim % self.o_groups:
            bad("o_groups", f"the heads' outputs ({self.num_attention_heads} x {self.head_dim}) must split evenly "
                            "into o_groups groups")
        if not self.swiglu_limit > 0:
            bad("swiglu_limit", "must be a positive number (V4: 10)")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            bad("num_experts_per_tok", f"must be between 1 and n_routed_experts ({self.n_routed_experts})")
        compressed = set(self.layer_types) - {"sliding_attention"}
        rates = self.compress_rates
        if compressed and (not isinstance(rates, dict) or any(
                isinstance(rates.get(t), bool) or not isinstance(rates.get(t), int) or rates.get(t) < 1
                for t in compressed)):
            bad("compress_rates", f"needs a positive integer rate for each compressed type used ({sorted(compressed)})")
        if "compressed_sparse_attention" in self.layer_types:
            self.check_indexer(bad, "compressed sparse attention's indexer needs index_topk, index_head_dim and "
                                    "index_n_heads set to positive integers", rotated="last")
        rs = self.rope_scaling
        if rs is not None and rs.get("type", rs.get("rope_type")) not in ("yarn", "default", None):
            bad("rope_scaling", "only YaRN scaling (of the compressed layers' RoPE) is supported")
        if self.yarn and ("factor" not in rs or "original_max_position_embeddings" not in rs):
            bad("rope_scaling", "YaRN needs factor and original_max_position_embeddings")

    def check_indexer(self, bad, needs: str, rotated: str) -> None:
        """A lightning indexer's fields (V3.2's DSA, V4's CSA): index_topk, index_head_dim and
        index_n_heads positive integers (else `needs`), index_head_dim as wide as the rotary dims it
        rotates (its `rotated` qk_rope_head_dim)."""
        for name in ("index_topk", "index_head_dim", "index_n_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                bad(name, needs)
        if self.index_head_dim < self.qk_rope_head_dim:
            bad("index_head_dim", f"the indexer rotates its {rotated} qk_rope_head_dim ({self.qk_rope_head_dim}) "
                                  "dims, so it must be at least that")

    def validate_sparse_attention(self, bad) -> None:
        if all(getattr(self, name) is None for name in ("index_topk", "index_head_dim", "index_n_heads")):
            return
        self.check_indexer(bad, "DeepSeek Sparse Attention needs index_topk, index_head_dim and index_n_heads all "
                                "set to positive integers (or all null for dense V3 attention)", rotated="first")
        if self.q_lora_rank is None:
            bad("q_lora_rank", "the DSA indexer reads the compressed query latent: set q_lora_rank")
        if self.scoring_func != "sigmoid":
            bad("scoring_func", 'DeepSeek-V3.2 routes with V3\'s sigmoid router: set it to "sigmoid"')
        if not self.rope_interleave:
            bad("rope_interleave", "DeepSeek-V3.2 checkpoints store MLA's rotary dims interleaved "
                                   "(transformers' DeepseekV32 has no other layout): set it to true")

    # -------------------------------------------------------- HF config.json

    # Keys of an HF config.json that carry no architecture (or that we derive) and are accepted silently.
    _IGNORED_KEYS = frozenset({
        "architectures", "model_type", "transformers_version", "auto_map", "use_cache",
        "quantization_config", "ep_size", "seq_aux", "num_experts_per_tok_", "pretraining_tp",
        "head_dim", "qk_head_dim", "output_router_logits", "router_aux_loss_coef", "dtype",
        "mlp_layer_types", "tie_last_hidden_states", "mtp_hidden_states_first", "use_mtp",
        "rope_parameters", "name_or_path", "_name_or_path", "num_local_experts", "num_mtp_layers",
        "return_dict", "output_hidden_states", "output_attentions", "chunk_size_feed_forward",
        "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class",
        "_attn_implementation_autoset", "layer_types", "max_window_layers", "use_sliding_window",
        "sliding_window", "mlp_bias",
    })

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Read an HF DeepseekV3/DeepseekV2/V32/V4 config dict. Unknown fields are an error naming them."""
        d = dict(d)
        if d.get("model_type") == "deepseek_v4":
            d = v4_fields_from_dict(d)
        else:  # keys other models' files carry (HF writes head_dim for V3): ignored, as before V4
            for key in ("head_dim", "layer_types", "mlp_layer_types", "sliding_window"):
                d.pop(key, None)
        # HF 5.x spells rope scaling as `rope_parameters` (with rope_theta inside) and MTP depth as
        # num_mtp_layers; older files use rope_scaling + rope_theta and num_nextn_predict_layers.
        rp = d.get("rope_parameters")
        if rp and "rope_scaling" not in d:
            rp = dict(rp)
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            if rp.get("rope_type", rp.get("type")) not in (None, "default"):
                d["rope_scaling"] = rp
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if "num_local_experts" in d and "n_routed_experts" not in d:
            d["n_routed_experts"] = d["num_local_experts"]
        if d.get("dtype") and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        if d.get("model_type") == "deepseek_v2":  # a field a V2 file leaves out has V2's default, not V3's
            for key, value in DEEPSEEK_V2_DEFAULTS.items():
                d.setdefault(key, value)
        if d.get("model_type") == "deepseek_v32":  # what DeepseekV32Config means by leaving them out
            for key, value in DEEPSEEK_V32_DEFAULTS.items():
                d.setdefault(key, value)
        fields = cls.known_fields(d)
        if fields.get("n_routed_experts") is None:  # V2/V3 configs of dense models write null
            fields["n_routed_experts"] = 0
        for key in ("n_group", "topk_group"):  # null (transformers' V2 default): no expert groups
            if key in fields and fields[key] is None:
                fields[key] = 1
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict: loadable by transformers' DeepseekV3Config (V4Config for a V4 model)
        and by from_dict."""
        if self.is_v4:
            return v4_dict(self)
        d = dataclasses.asdict(self)
        for key in V4_FIELDS:
            del d[key]
        # a softmax router is DeepSeek-V2's architecture; HF's V3 class hard-codes the sigmoid one
        # (and an mHC model is none of transformers' classes: see the module docstring)
        arch = ("DeepseekV3MHCForCausalLM", "deepseek_v3_mhc") if self.hc_mult is not None else \
               ("DeepseekV2ForCausalLM", "deepseek_v2") if self.scoring_func == "softmax" else \
               ("DeepseekV32ForCausalLM", "deepseek_v32") if self.sparse_attention else \
               ("DeepseekV3ForCausalLM", "deepseek_v3")
        d = {"architectures": [arch[0]], "model_type": arch[1], **d}
        if self.rope_scaling is None:
            del d["rope_scaling"]
        if not self.sparse_attention:  # a V3 / V2 config.json stays as it always was
            for key in ("index_topk", "index_head_dim", "index_n_heads"):
                del d[key]
        if self.hc_mult is None:
            for key in ("hc_mult", "hc_sinkhorn_iters", "hc_eps"):
                del d[key]
        d["head_dim"] = self.qk_rope_head_dim  # what HF derives; vLLM reads it
        d["use_cache"] = True
        return d


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


# ------------------------------------------------------------------ DeepSeek-V4's config.json

def v4_fields_from_dict(d: dict[str, Any]) -> dict[str, Any]:
    """A transformers DeepseekV4Config dict -> ModelConfig fields (what from_dict then reads): its
    defaults for the keys it leaves out, its legacy keys (compress_ratios, num_hash_layers, ...)
    folded in as DeepseekV4Config.__post_init__ does, its nested rope_parameters unnested."""
    d = {**DEEPSEEK_V4_DEFAULTS, **d}
    n = d.get("num_hidden_layers")
    rates = dict(d.get("compress_rates") or {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128})
    for legacy, kind in (("compress_rate_csa", "compressed_sparse_attention"),
                         ("compress_rate_hca", "heavily_compressed_attention")):
        if d.get(legacy) is not None:
            rates[kind] = d.pop(legacy)
    d["compress_rates"] = rates
    by_ratio = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    ratios = d.pop("compress_ratios", None)
    if d.get("layer_types") is None and ratios is not None:
        d["layer_types"] = [by_ratio.get(r, r) for r in ratios]
    if d.get("layer_types") is None and isinstance(n, int):  # V4-Pro's: 2 HCA, then CSA / HCA in turn
        d["layer_types"] = (["heavily_compressed_attention"] * min(n, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(n - 2, 0))])
    hash_layers = d.pop("num_hash_layers", None)
    if d.get("mlp_layer_types") is None and isinstance(n, int):
        k = 3 if hash_layers is None else hash_layers
        d["mlp_layer_types"] = ["hash_moe"] * min(n, k) + ["moe"] * max(0, n - k)
    for key in ("layer_types", "mlp_layer_types"):
        if isinstance(d[key], list) and isinstance(n, int):
            d[key] = list(d[key][:n])
    factor = d.pop("partial_rotary_factor", None)
    if d.get("qk_rope_head_dim") is None:
        d["qk_rope_head_dim"] = int(d["head_dim"] * (64 / 512 if factor is None else factor))
    rp = d.pop("rope_parameters", None) or {}
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        d["rope_theta"] = rp["main"].get("rope_theta", d.get("rope_theta", 10000.0))
        d["compress_rope_theta"] = rp["compress"].get("rope_theta", d.get("compress_rope_theta", 160000.0))
        rp = rp["compress"]
    scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", scaling.get("type")) not in (None, "default") and "rope_scaling" not in d:
        d["rope_scaling"] = scaling
    # transformers keeps no MTP module for V4 and drops its weights: so does nanoseek (validate_v4)
    d["num_nextn_predict_layers"] = 0
    for key in ("router_jitter_noise", "expert_dtype"):  # transformers' training / quantization knobs
        d.pop(key, None)
    return d


def v4_dict(config: ModelConfig) -> dict[str, Any]:
    """The config.json of a V4 model: transformers' DeepseekV4Config fields, in its order."""
    c = config
    factor = c.qk_rope_head_dim / c.head_dim
    compress = {"rope_type": "default"} if c.rope_scaling is None else dict(c.rope_scaling)
    if compress.get("rope_type", compress.get("type")) == "yarn":
        compress.setdefault("attention_factor", 1.0)  # DeepseekV4Config's: V4 does not scale cos/sin
    d = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"}
    for key in ("vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "q_lora_rank", "num_experts_per_tok", "n_routed_experts",
                "n_shared_experts", "scoring_func", "norm_topk_prob", "routed_scaling_factor",
                "max_position_embeddings", "rope_theta", "layer_types", "compress_rates", "compress_rope_theta",
                "hc_mult", "hc_sinkhorn_iters", "hc_eps", "mlp_layer_types", "swiglu_limit", "sliding_window",
                "o_groups", "o_lora_rank", "index_n_heads", "index_head_dim", "index_topk",
                "num_nextn_predict_layers", "hidden_act", "initializer_range", "rms_norm_eps",
                "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "attention_bias",
                "attention_dropout"):
        value = getattr(c, key)
        d[key] = list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value
    d["rope_parameters"] = {
        "main": {"rope_type": "default", "rope_theta": c.rope_theta, "partial_rotary_factor": factor},
        "compress": {**compress, "rope_theta": c.compress_rope_theta, "partial_rotary_factor": factor}}
    d["partial_rotary_factor"] = factor
    d["qk_rope_head_dim"] = c.qk_rope_head_dim
    if c.aux_loss_alpha:  # nanoseek's sequence-wise balance loss (DeepSeek's field name), only when on
        d["aux_loss_alpha"] = c.aux_loss_alpha
    d["dtype"] = c.torch_dtype
    d["use_cache"] = True
    return d


# ------------------------------------------------------------------ presets

PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: < 1M parameters, every feature on (q_lora, 2 groups, MTP, a dense first layer).
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=512,
        num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1,
    ),
    # The CPU demo model: a few million parameters, trains in minutes on 2 cores.
    "small": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=704, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=128, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=1024,
        num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1,
    ),
    # One GPU: V3's shapes scaled down (~0.56B total, ~0.15B activated). Head dims keep V3's ratios
    # (nope : rope : v = 2 : 1 : 2, kv_lora_rank = 4 x nope), 64 fine-grained experts in 8 groups,
    # top-6 in the best 4 groups, one shared expert, a dense first layer, one MTP module.
    "gpu": dict(
        vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
        num_hidden_layers=10, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=1, n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=384, kv_lora_rank=256,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=4096,
        num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1,
    ),
    # The R1-Zero demo's reasoning base (configs/pretrain_reasoning.toml): 1.4M parameters, sized by
    # measurement to learn the digit-sum chain in 10 minutes on 2 cores. MLA with 32 rotary dims:
    # position reaches attention only through the rotary part, and with 16 (the `small` preset's) the
    # model never learned to fetch the digit a fixed distance back (measured in a probe before the demo).
    # No q compression, MoE in layers 2-4 (+ MTP), a wide init (0.08) that the probe needed.
    "reasoning": dict(
        vocab_size=512, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=32, v_head_dim=32, max_position_embeddings=256,
        num_nextn_predict_layers=1, initializer_range=0.08, bos_token_id=0, eos_token_id=1,
    ),
    # DeepSeek-V2-Lite (16B total, 2.4B active): softmax greedy router, no q compression.
    "v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=False, scoring_func="softmax", topk_method="greedy",
        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        num_nextn_predict_layers=0, aux_loss_alpha=0.001, bos_token_id=100000, eos_token_id=100001,
        torch_dtype="bfloat16",
    ),
    # DeepSeek-V4 at toy size (~0.5M parameters): one layer of each attention type plus a second CSA,
    # hash-routed MoE in the first two layers, learned routers after; a window of 8 and compression
    # rates 2 (CSA) and 8 (HCA), so that a 32-token training row uses every branch. No MTP (validate_v4).
    "v4-tiny": dict(
        vocab_size=512, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, qk_rope_head_dim=8, q_lora_rank=32,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 8},
        sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=4, index_head_dim=16, index_topk=3,
        hc_mult=2, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
        scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, first_k_dense_replace=0,
        max_position_embeddings=512, num_nextn_predict_layers=0, bos_token_id=0, eos_token_id=1,
    ),
    # DeepSeek-V3 / R1 (671B total, 37B active, plus one MTP module).
    "v3": dict(
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        torch_dtype="bfloat16",
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset, with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
