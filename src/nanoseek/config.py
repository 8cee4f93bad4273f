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

Fields keep HF's names and meanings so that nobody has to learn a second vocabulary; the few that HF
lacks (the V2 router's `scoring_func` / `topk_method`, `moe_layer_freq`) are the ones DeepSeek's own
config.json files carry.

Presets: `tiny` (unit tests), `small` (the CPU demo model), `reasoning` (the R1-Zero demo's base),
`gpu` (a one-GPU model with V3's shape ratios), `v2-lite` and `v3` (the released sizes, for counting
parameters on the meta device and for loading real checkpoints).
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
    def sparse_attention(self) -> bool:
        """DeepSeek-V3.2's DSA: every attention layer (MTP's too) has an indexer."""
        return self.index_topk is not None

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
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "rotary dims come in pairs, so it must be even")
        if self.num_key_value_heads != self.num_attention_heads:
            bad("num_key_value_heads", f"MLA has one K/V per head: set it to num_attention_heads "
                                       f"({self.num_attention_heads})")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            bad("q_lora_rank", "must be a positive integer, or null for an uncompressed q_proj")
        if self.scoring_func not in ("sigmoid", "softmax"):
            bad("scoring_func", 'must be "sigmoid" (V3) or "softmax" (V2)')
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

    def validate_sparse_attention(self, bad) -> None:
        index = {name: getattr(self, name) for name in ("index_topk", "index_head_dim", "index_n_heads")}
        if all(v is None for v in index.values()):
            return
        for name, value in index.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                bad(name, "DeepSeek Sparse Attention needs index_topk, index_head_dim and index_n_heads all set "
                          "to positive integers (or all null for dense V3 attention)")
        if self.index_head_dim < self.qk_rope_head_dim:
            bad("index_head_dim", f"the indexer rotates its first qk_rope_head_dim ({self.qk_rope_head_dim}) "
                                  "dims, so it must be at least that")
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
        """Read an HF DeepseekV3/DeepseekV2 config dict. Unknown fields are an error naming them."""
        d = dict(d)
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
        """The config.json dict: loadable by transformers' DeepseekV3Config and by from_dict."""
        d = dataclasses.asdict(self)
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
