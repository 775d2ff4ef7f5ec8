# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""Configuration of Titans models (Behrouz, Zhong, Mirrokni 2024)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .memory_rule import check_memory_arguments
from .rule_registry import MEMORY_RULES, rule_class, rule_settings

VARIANTS = ("mac", "mag", "mal", "lmm")

# RoPE types whose frequencies are a fixed function of their parameters, with the parameters each needs and may have
# (besides `rope_type` and `rope_theta`). Length-dependent types (`dynamic`, `longrope`) are refused in `check_rope`.
ROPE_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
}


@strict
class TitansConfig(PreTrainedConfig):
    r"""
    Configuration of a [`TitansModel`] / [`TitansForCausalLM`]: a decoder whose layers hold the Titans neural
    long-term memory, composed with attention as one of the paper's four variants.

    Standard fields follow Llama (`vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`,
    `num_attention_heads`, `num_key_value_heads`, `head_dim`, `hidden_act`, `rope_parameters`, `rms_norm_eps`,
    `initializer_range`, `tie_word_embeddings`, `pad/bos/eos_token_id`, `use_cache`, `attention_dropout`,
    `attention_bias`, `mlp_bias`), so that a Llama, Mistral, Qwen2 or Qwen3 checkpoint converts exactly
    ([`TitansForCausalLM.from_base_model`]):

    attention_bias (`bool`, defaults to `False`): biases on the attention's q, k, v and output projections (Llama's
        `attention_bias`).
    attention_output_bias (`bool`, *optional*): bias on the attention's output projection; defaults to
        `attention_bias` (Qwen2 has biases on q, k and v only).
    mlp_bias (`bool`, defaults to `False`): biases on the MLP's projections (Llama's `mlp_bias`).
    qk_norm (`bool`, defaults to `False`): a per-head RMSNorm on the queries and keys before RoPE (Qwen3).
    hidden_act (`str`, defaults to `"silu"`): the activation of the gated MLP (a key of `transformers.ACT2FN`).
    rope_parameters (`dict`, *optional*): `rope_type` `"default"`, `"linear"`, `"llama3"` or `"yarn"`, with their
        parameters (`factor`, ...; the scaled types also `original_max_position_embeddings`, which Transformers would
        otherwise take from the absent `max_position_embeddings`). Attention only sees distances inside its window
        or segment, so a model trained from scratch needs no scaling; a converted model keeps its base's frequencies
        (and yarn's attention scaling) to start as the base. Length-dependent types (`dynamic`, `longrope`) are
        refused: their frequencies change with the length of the sequence.

    There is deliberately no `max_position_embeddings`: the model has no length limit (relative RoPE inside a
    bounded window or segment, a recurrent memory), and Transformers' `generate()` and evaluation harnesses read that
    field as one (they cap or truncate to it, and warn past it). Like Transformers' Mamba, the config leaves it out;
    the length the weights were trained at is recorded as `training_context_length`. A `max_position_embeddings`
    passed in (older checkpoints, Llama habits) is read as `training_context_length`.

    training_context_length (`int`, defaults to 4096):
        Tokens per training sequence the weights were (or are to be) trained at: a record, not a limit. The example
        scripts train at it by default (`--block_size`) and write the block size they used.

    Titans fields:

    variant (`str`, defaults to `"mac"`):
        `"mac"` (memory as context: attention over `[persistent || memory read || segment]`), `"mag"` (memory as
        gate: sliding-window attention and memory in parallel, gated), `"mal"` (memory as layer: memory, then
        sliding-window attention) or `"lmm"` (the memory alone).
    segment_size (`int`, defaults to 512):
        MAC: length of the segments attention runs over. A multiple of `memory_chunk_size`.
    sliding_window (`int`, defaults to 512):
        MAG / MAL: attention window (the token itself and the `sliding_window - 1` before it).
    mac_memory_input (`str`, *optional*):
        MAC: what writes the memory. `"input"`: the segment's normed input, the stream every other variant writes
        (the default of every rule but `"titans"`: on our recall benchmark it learns where the paper's choice stays at
        chance, README "Design choices"); `"attention"`: the attention output `y`, normalised (the paper's eq. 24,
        the default of `memory_rule="titans"`).
    num_persistent_tokens (`int`, *optional*):
        Learned, input-independent tokens every attention query can see. Defaults to 4 for the attention variants
        and 0 for `"lmm"` (which has no attention for them to enter).
    memory_layers (`list[int]`, *optional*):
        Indices of the layers that hold a memory (default: all). The other layers are attention-only (MAC: segment
        attention; MAG/MAL: sliding-window attention). `"lmm"` needs a memory in every layer.
    memory_depth (`int`, defaults to 2): layers of the memory MLP (1: linear matrix memory).
    memory_expansion (`int`, defaults to 4): hidden width of the memory MLP, in multiples of `memory_head_dim`.
    memory_num_heads (`int`, *optional*): independent memories per layer (default: `num_attention_heads`).
    memory_head_dim (`int`, *optional*): key/value width of each memory (default: `hidden_size // memory_num_heads`).
    memory_chunk_size (`int`, defaults to 64):
        Tokens per inner mini-batch: every gradient of a chunk is taken at the chunk-start weights (paper §3.2).
        Part of the function, used identically in training and decoding; 1 is exact online gradient descent.
    memory_conv_kernel (`int`, defaults to 4): causal depthwise convolution on q, k, v (0 or 1: none).
    memory_rule (`str`, defaults to `"titans-hf"`):
        How the memory learns (README, "Memory rules"): `"titans-hf"` (the paper's rule with the changes that make it
        learn at its defaults), `"titans"` (the paper's eq. 13-14 literally), and the rules of the papers that
        generalised it. A rule's own settings are config fields of their own (e.g. `moneta_p`); the memory fields
        below left unset take the rule's defaults.
    memory_momentum (`bool`, *optional*): the momentum ("surprise") term (eq. 14); default: the rule's.
    memory_forget (`bool`, defaults to `True`): the data-dependent forgetting gate (eq. 13).
    memory_max_lr (`float`, *optional*): the inner learning rate's bound: each token's `theta` lies in
        (0, `memory_max_lr`) (half of it at initialisation). With `"titans-hf"` (default 1.0) it is also the chunk's
        budget: within a chunk the learning rates of the tokens so far are scaled down to sum to at most
        `memory_max_lr`, and each token's step is divided by its step curvature (README, "the write rule"). Default:
        the rule's.
    memory_max_weight_rms (`float`, *optional*): safeguard; at every chunk boundary the memory's carried matrices
        (with `"titans-hf"`: the fast weights' deviation from their learned initial value `W_0`, and the momentum)
        are scaled down to this root-mean-square value if they exceed it (`None`: off). It does nothing in the normal
        range and bounds an overshooting inner optimisation. Default (`"auto"`): the rule's (1.0 for `"titans-hf"`,
        off for the papers' rules).

    ```python
    >>> from titans_hf import TitansConfig, TitansForCausalLM
    >>> config = TitansConfig(variant="mag", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
    ...                       intermediate_size=688, vocab_size=256, sliding_window=64)
    >>> model = TitansForCausalLM(config)
    ```
    """

    model_type = "titans"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    training_context_length: int = 4096
    rope_parameters: RopeParameters | dict | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    use_cache: bool = True
    attention_dropout: float | int = 0.0
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_output_bias: bool | None = None
    mlp_bias: bool = False
    qk_norm: bool = False

    variant: str = "mac"
    segment_size: int = 512
    sliding_window: int = 512
    mac_memory_input: str | None = None
    num_persistent_tokens: int | None = None
    memory_layers: list[int] | None = None
    memory_depth: int = 2
    memory_expansion: int = 4
    memory_num_heads: int | None = None
    memory_head_dim: int | None = None
    memory_chunk_size: int = 64
    memory_conv_kernel: int = 4
    memory_rule: str = "titans-hf"
    memory_momentum: bool | None = None
    memory_forget: bool = True
    memory_max_lr: float | int | None = None
    memory_max_weight_rms: float | int | str | None = "auto"

    def __post_init__(self, **kwargs):
        legacy_length = kwargs.pop("max_position_embeddings", None)
        if legacy_length is not None:
            self.training_context_length = legacy_length
        if isinstance(self.variant, str):
            self.variant = self.variant.lower()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attention_output_bias is None:
            self.attention_output_bias = self.attention_bias
        if self.head_dim is None and _positive(self.num_attention_heads):
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_persistent_tokens is None:
            self.num_persistent_tokens = 0 if self.variant == "lmm" else 4
        if self.memory_num_heads is None:
            self.memory_num_heads = self.num_attention_heads
        if self.memory_head_dim is None and _positive(self.memory_num_heads):
            self.memory_head_dim = self.hidden_size // self.memory_num_heads
        if self.memory_layers is None and _positive(self.num_hidden_layers):
            self.memory_layers = list(range(self.num_hidden_layers))
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        kwargs = self._set_rule_settings(kwargs)
        self.check()
        super().__post_init__(**kwargs)

    def _set_rule_settings(self, kwargs: dict) -> dict:
        """Takes the memory rule's own settings out of ``kwargs`` (refusing another rule's) and fills what is unset
        with the rule's defaults. Returns the other keyword arguments."""
        if isinstance(self.memory_rule, str):
            self.memory_rule = self.memory_rule.lower()
        rule = rule_class(self.memory_rule)
        for name, owner in rule_settings().items():
            if name in kwargs and owner != rule.name:
                raise ValueError(
                    f"{name} is a setting of memory_rule={owner!r}, but memory_rule={rule.name!r} (its settings: "
                    f"{', '.join(rule.settings) or 'none'})."
                )
        for name, setting in rule.settings.items():
            setattr(self, name, kwargs.pop(name, setting.default))
        for field, name in (
            ("memory_momentum", "momentum"),
            ("memory_max_lr", "max_lr"),
            ("mac_memory_input", "mac_memory_input"),
        ):
            if getattr(self, field) is None:
                setattr(self, field, rule.defaults[name])
        if self.memory_max_weight_rms == "auto":
            self.memory_max_weight_rms = rule.defaults["max_weight_rms"]
        return kwargs

    @property
    def memory_rule_settings(self) -> dict:
        """The memory rule's own settings, by name (e.g. ``{"moneta_p": 3, "moneta_q": 4}``; a setting not set: the
        rule's default)."""
        settings = rule_class(self.memory_rule).settings
        return {name: getattr(self, name, setting.default) for name, setting in settings.items()}

    def check(self) -> None:
        """Raises ``ValueError`` naming the first invalid field and what is allowed."""
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}.")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "training_context_length",
            "segment_size",
            "sliding_window",
        ):
            if not _positive(getattr(self, name)):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}.")
        if self.memory_rule not in MEMORY_RULES:
            raise ValueError(f"memory_rule must be one of {sorted(MEMORY_RULES)}, got {self.memory_rule!r}.")
        if self.memory_max_weight_rms == "auto":  # (resolved when the config is built; again after an edit)
            self.memory_max_weight_rms = rule_class(self.memory_rule).defaults["max_weight_rms"]
        check_memory_arguments(  # the memory's own checks (NeuralMemory runs the same)
            prefix="memory_",
            num_heads=self.memory_num_heads,
            head_dim=self.memory_head_dim,
            depth=self.memory_depth,
            expansion=self.memory_expansion,
            chunk_size=self.memory_chunk_size,
            conv_kernel=self.memory_conv_kernel,
            momentum=self.memory_momentum,
            forget=self.memory_forget,
            max_lr=self.memory_max_lr,
            max_weight_rms=self.memory_max_weight_rms,
        )
        rule_class(self.memory_rule).check_settings(self.memory_rule_settings)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})."
            )
        self.check_rope()
        for name in ("attention_bias", "attention_output_bias", "mlp_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"hidden_act must be an activation of transformers.ACT2FN (e.g. 'silu', 'gelu_pytorch_tanh'), got "
                f"{self.hidden_act!r}."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}.")
        if self.segment_size % self.memory_chunk_size:
            raise ValueError(
                f"segment_size ({self.segment_size}) must be a multiple of memory_chunk_size "
                f"({self.memory_chunk_size}), so that segments start on chunk boundaries."
            )
        if self.mac_memory_input not in ("input", "attention"):
            raise ValueError(
                f"mac_memory_input must be 'input' (the segment's normed input) or 'attention' (the attention output, "
                f"the paper's eq. 24), got {self.mac_memory_input!r}."
            )
        if not isinstance(self.num_persistent_tokens, int) or self.num_persistent_tokens < 0:
            raise ValueError(f"num_persistent_tokens must be an integer >= 0, got {self.num_persistent_tokens!r}.")
        if self.variant == "lmm" and self.num_persistent_tokens:
            raise ValueError(
                "num_persistent_tokens must be 0 for variant='lmm': the memory-only model has no attention for "
                f"persistent tokens to enter (got {self.num_persistent_tokens})."
            )
        if not (0.0 <= self.attention_dropout < 1.0):
            raise ValueError(f"attention_dropout must lie in [0, 1), got {self.attention_dropout!r}.")
        layers = self.memory_layers
        if (
            not isinstance(layers, list)
            or any(not isinstance(i, int) or not 0 <= i < self.num_hidden_layers for i in layers)
            or len(set(layers)) != len(layers)
        ):
            raise ValueError(
                f"memory_layers must be a list of distinct layer indices in [0, {self.num_hidden_layers}), "
                f"got {layers!r}."
            )
        if self.variant == "lmm" and sorted(layers) != list(range(self.num_hidden_layers)):
            raise ValueError(
                f"variant='lmm' needs a memory in every layer (memory_layers = all {self.num_hidden_layers} "
                f"layers), got {layers!r}."
            )

    def check_rope(self) -> None:
        """Raises ``ValueError`` unless ``rope_parameters`` is a length-independent RoPE with its parameters."""
        rope = self.rope_parameters
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be a dict with a 'rope_type', got {rope!r}.")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in ("dynamic", "longrope"):
            raise ValueError(
                f"rope_parameters['rope_type'] {rope_type!r} is not supported: its frequencies change with the length "
                "of the sequence, and Titans reads streams of any length with attention over a bounded window. Use "
                f"one of {tuple(ROPE_TYPES)} (a converted 'dynamic' base is exactly 'default' within its trained "
                "length, and is converted as such)."
            )
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_parameters['rope_type'] must be one of {tuple(ROPE_TYPES)}, got {rope_type!r}.")
        required, optional = ROPE_TYPES[rope_type]
        given = set(rope) - {"rope_type", "type", "rope_theta"}
        missing = [k for k in required if rope.get(k) is None]
        unknown = sorted(given - set(required) - set(optional) - {"partial_rotary_factor"})
        if missing or unknown:
            raise ValueError(
                f"rope_parameters of rope_type {rope_type!r} need {list(required) or 'no other keys'}"
                + (f" (and may have {list(optional)})" if optional else "")
                + f"; missing {missing}, unknown {unknown}: got {rope!r}."
            )
        theta = rope.get("rope_theta", self.default_theta)
        if not (isinstance(theta, (int, float)) and theta > 0):
            raise ValueError(f"rope_parameters['rope_theta'] must be a number > 0, got {theta!r}.")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"rope_parameters['partial_rotary_factor'] must be 1.0 (Titans rotates whole heads), got "
                f"{rope['partial_rotary_factor']!r}."
            )
        for key in ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"):
            if key in rope and not (isinstance(rope[key], (int, float)) and rope[key] > 0):
                raise ValueError(f"rope_parameters[{key!r}] must be a number > 0, got {rope[key]!r}.")

    def standardize_rope_params(self) -> None:
        """Transformers' version fills a scaled RoPE's `original_max_position_embeddings` from
        `max_position_embeddings`, which this config does not have: here it must be given (`check_rope`)."""
        rope = self.rope_parameters or {}
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope.setdefault("rope_theta", getattr(self, "rope_theta", None) or self.default_theta)
        self.rope_parameters = rope

    def validate_rope(self) -> None:
        """Part of `@strict`-powered validation: `check_rope` (Transformers' version reads `max_position_embeddings`)."""
        self.check_rope()

    def validate_architecture(self):
        """Part of `@strict`-powered validation (e.g. after editing a field): the same checks as at construction."""
        self.check()


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


__all__ = ["TitansConfig"]
