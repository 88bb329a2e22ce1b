"""The typed configuration tree: the one place where every key, default and help text lives.

The YAML has the workflow template's sections (model, data, training, optimization,
constraints, compute, logging). Loading validates everything before any model is touched:
unknown keys, wrong types and impossible values raise `ConfigError` naming file and key.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import UserError


class ConfigError(UserError):
    """A config problem a user must fix; the CLI prints it and exits with code 2."""


def opt(default, help: str, choices=None, min=None, gt=None, max=None, lt=None):
    """A config field with its help text and constraints (min/max inclusive, gt/lt strict)."""
    meta = dict(help=help, choices=choices, min=min, gt=gt, max=max, lt=lt)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    base_model: Optional[str] = opt(None, "Required (or reference_model): Hugging Face repo id or local mlx-lm folder.")
    reference_model: Optional[str] = opt(None, "Frozen reference (the SFT checkpoint). Default: base_model.")
    policy_model: Optional[str] = opt(None, "Model the policy starts from. Default: reference_model.")
    finetune: str = opt("lora", "lora: train adapters, reference = adapters off. full: train all weights.",
                        choices=["lora", "full"])
    lora_rank: int = opt(8, "LoRA rank.", min=1)
    lora_scale: float = opt(20.0, "LoRA scale: the multiplier of the adapters' output, mlx-lm's `scale` (PEFT's "
                                "lora_alpha / r: 20 is alpha 160 at rank 8).", gt=0)
    lora_dropout: float = opt(0.0, "Dropout on the LoRA branch.", min=0, lt=1)
    lora_layers: int = opt(-1, "Number of transformer blocks (from the top) that get adapters; -1 = all.", min=-1)
    lora_keys: Optional[list] = opt(None, "Module paths inside a block to adapt, e.g. [self_attn.q_proj, "
                                          "self_attn.v_proj]. Default: every linear layer.")
    trust_remote_code: bool = opt(False, "Allow model code shipped with a Hugging Face repo.")


@dataclass
class DataConfig:
    train_file: Optional[str] = opt(None, "Required: JSONL preference pairs for training.")
    validation_file: Optional[str] = opt(None, "JSONL preference pairs for evaluation (eval/ metrics, KL).")
    max_prompt_length: int = opt(512, "Prompt tokens kept (the end of longer prompts is kept).", min=1)
    max_response_length: int = opt(1024, "Completion tokens kept, EOS included (the start is kept).", min=1)
    chat_template: str = opt("auto", "Apply the tokenizer's chat template: auto (when it has one), on, off.",
                             choices=["auto", "on", "off"])
    on_bad_record: str = opt("error", "A malformed record stops the run (error) or is skipped and counted (skip).",
                             choices=["error", "skip"])
    max_eval_pairs: int = opt(0, "Evaluate on at most this many validation pairs; 0 = all.", min=0)


@dataclass
class TrainingConfig:
    learning_rate: float = opt(1.0e-6, "Peak learning rate.", gt=0)
    beta: float = opt(0.1, "DPO beta: strength of the implicit KL penalty.", gt=0)
    batch_size: Union[int, str] = opt(4, "Pairs per micro-batch per device, or `auto` (per-chip table).", min=1)
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", min=1)
    max_steps: int = opt(1000, "Optimizer steps to train.", min=1)
    warmup_steps: int = opt(0, "Linear warm-up steps up to learning_rate (step i of n runs at (i+1)/n of it, "
                                  "never at 0).", min=0)
    logging_steps: int = opt(10, "Log training metrics every N steps.", min=1)
    eval_steps: int = opt(100, "Evaluate on the validation file every N steps (and at 0 and the end).", min=1)
    save_steps: int = opt(100, "Save a checkpoint every N steps (and at the end).", min=1)
    loss_type: str = opt("sigmoid", "DPO loss: sigmoid (DPO), ipo, hinge, robust.",
                         choices=["sigmoid", "ipo", "hinge", "robust"])
    label_smoothing: float = opt(0.0, "Assumed label-noise rate for sigmoid (cDPO) and robust losses.", min=0, lt=0.5)
    seed: int = opt(42, "Seed for data order, LoRA initialisation and dropout.")
    max_bad_steps: int = opt(3, "Consecutive non-finite steps (skipped) before the run stops.", min=1)
    precompute_reference: bool = opt(True, "Compute the reference log-probs of the training pairs once before "
                                           "training and cache them on disk (keyed by data, model and "
                                           "tokenization), instead of a reference forward in every step.")
    reference_cache_dir: Optional[str] = opt(None, "Where cached reference log-probs (and evaluation's hidden states) live. Default: "
                                                   "$MLX_DPO_CACHE_DIR/reference-logps, else ~/.cache/mlx-dpo/reference-logps.")
    eval_reference_cache_gb: float = opt(1.0, "Keep the reference's final hidden states at the validation pairs' "
                                              "completion positions (made at the first evaluation, cached on disk "
                                              "beside the log-probs), so that later evaluations run no reference "
                                              "forward: the KL and preference gap behind the gates come from them "
                                              "exactly. Skipped when they would take more GB of memory than this; "
                                              "0 turns it off.", min=0)
    share_prompt: bool = opt(True, "Run each pair's prompt once for chosen and rejected (same log-probs, "
                                   "less compute; models whose attention has no RoPE `rope` module run each "
                                   "sequence whole).")


@dataclass
class OptimizationConfig:
    optimizer: str = opt("adamw", "Optimizer.", choices=["adamw"])
    weight_decay: float = opt(0.01, "AdamW decoupled weight decay.", min=0)
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this; 0 disables clipping.", min=0)
    lr_scheduler: str = opt("cosine", "Schedule after warm-up.", choices=["cosine", "linear", "constant"])
    min_lr_ratio: float = opt(0.0, "Final learning rate of cosine/linear decay, as a fraction of the peak.",
                              min=0, max=1)
    adam_beta1: float = opt(0.9, "AdamW beta1.", min=0, lt=1)
    adam_beta2: float = opt(0.999, "AdamW beta2.", min=0, lt=1)
    adam_epsilon: float = opt(1.0e-8, "AdamW epsilon.", gt=0)


@dataclass
class ConstraintsConfig:
    kl_target: float = opt(0.1, "Maximum validation KL(policy || reference) per completion token.", gt=0)
    preference_gap_target: float = opt(0.15, "Minimum preference gap on the validation pairs "
                                             "(docs/quality-gates.md defines it).", min=0, max=1)
    min_pairs: int = opt(1000, "Stage-2 gate: minimum number of preference pairs.", min=1)
    decontamination_target: float = opt(0.9, "Stage-2 gate: minimum share of pairs sharing no n-gram with the "
                                              "evaluation benchmarks.", min=0, max=1)
    kl_action: str = opt("warn", "When validation KL exceeds kl_target after an evaluation: warn (log, go on), "
                                 "stop (end the run, exit 1), rollback (restore the best checkpoint within "
                                 "the target and go on).", choices=["warn", "stop", "rollback"])
    max_rollbacks: int = opt(3, "kl_action rollback: rollbacks allowed before the run stops.", min=1)
    best_metric: str = opt("eval/loss", "Evaluation metric that ranks checkpoints within kl_target; the best "
                                        "is recorded in OUTPUT_DIR/best.json and kept by rotation.",
                           choices=["eval/loss", "eval/rewards/accuracies", "eval/rewards/margins",
                                    "eval/preference_gap", "eval/kl", "eval/rewards/chosen",
                                    "eval/rewards/rejected", "eval/logps/chosen", "eval/logps/rejected"])
    best_mode: str = opt("auto", "min or max of best_metric; auto: max for accuracies, margins, gap, "
                                 "chosen rewards/logps, min otherwise.", choices=["auto", "min", "max"])
    init_checks: bool = opt(True, "Run the stage-3 initialisation checks before training; a failed check "
                                  "stops the run (exit 1).")
    capability_retention_target: float = opt(95.0, "Stage-7 gate: minimum capability retention, percent of "
                                                   "the SFT baseline's benchmark scores.", min=0)
    win_rate_target: float = opt(50.0, "Stage-7 gate: the win rate against the baseline, percent, must "
                                       "exceed this.", min=0, max=100)


@dataclass
class ComputeConfig:
    fp16: bool = opt(False, "Half precision where the device supports it: on Metal float16 frozen weights "
                              "(LoRA's base, a separate reference; a full fine-tune's policy stays float32), on "
                              "CUDA bfloat16 (docs/backends.md); the CPU stays float32.")
    device: str = opt("auto", "auto (Metal, then CUDA, then CPU), metal, cuda or cpu.",
                      choices=["auto", "metal", "cuda", "cpu"])
    engine: str = opt("auto", "Compute engine: auto (MLX on Metal and CPU, PyTorch on CUDA), mlx, or torch "
                              "(the CUDA fallback; on the CPU too, e.g. to compare engines). See docs/backends.md.",
                      choices=["auto", "mlx", "torch"])
    memory_fraction: float = opt(0.8, "training.batch_size auto on a chip not in the batch table: the share of "
                                      "device memory the batch-size probe may fill.", gt=0, max=1)
    num_devices: int = opt(1, "Devices for data-parallel training (see docs/distributed.md).", min=1)
    split: str = opt("0.65,0.35", "Several machines (mlx-dpo launch): each rank's share of every global batch, "
                                  "in hostfile order, e.g. 0.65,0.35; or auto (measured by probe steps).")
    split_probe_steps: int = opt(3, "compute.split auto: timed probe steps per rank, after one warm-up step.", min=1)
    peer_timeout: float = opt(300.0, "Several machines: seconds a rank may wait for its peers in one exchange "
                                     "before the watchdog stops the run (peer stalled at step N).", gt=0)
    join_timeout: float = opt(120.0, "Several machines: seconds to wait for every rank to join and prove the "
                                     "shared secret.", gt=0)
    gradient_checkpointing: bool = opt(False, "Recompute block activations in the backward pass to save memory.")
    compile: bool = opt(True, "Trace the MLX training step with mx.compile (one trace per padded batch shape).")
    cpu_streams: int = opt(0, "MLX on the CPU: split each micro-batch's pairs over this many CPU streams (one "
                               "thread each, run side by side); 0 = one per CPU core, 1 = off. "
                               "No effect on Metal.", min=0)
    fast_cpu_math: bool = opt(True, "MLX on the CPU: attention softmax, SwiGLU and the LM head's log-softmax on "
                                    "a vectorisable exp (mlx_dpo/cpu_kernels.py; 5-9x MLX's CPU exp in a "
                                    "step's buffers, scripts/bench_cpu_ops.py, and as accurate); attention's own VJP; "
                                    "LoRA's low-rank product accumulated into the base matmul "
                                    "(mlx_dpo/cpu_lora.py); and, where mlx-dpo's C++ kernels are built "
                                    "(mlx_dpo/native.py; MLX_DPO_NATIVE=0 turns them off), attention, RMSNorm, "
                                    "SwiGLU, RoPE and the head's softmax in one pass each. No effect on Metal.")
    attention_block: int = opt(256, "MLX on the CPU, with fast_cpu_math: causal attention takes this many query "
                                     "rows at a time against the keys they can see (the masked upper triangle is "
                                     "skipped); over long sequences (a layer's queries x keys >= 1024 x 1024) each "
                                     "block recomputes its softmax in the backward instead of keeping it "
                                     "(mlx_dpo/cpu_attention.py); 0 = all rows at once, softmax kept. Only "
                                     "where the C++ attention does not apply (not built, or a head size other "
                                     "than 32/64/128): it takes each mask whole and keeps nothing that size. "
                                     "No effect on Metal.", min=0)
    recompute_activations: bool = opt(True, "MLX on the CPU, with fast_cpu_math and LoRA: recompute the SwiGLU product "
                                            "that feeds the down projection in the backward instead of keeping it "
                                            "from the forward (1536 floats per token and layer of SmolLM2-135M: "
                                            "0.28 GB less MLX peak on the bench's LoRA step, within a few percent "
                                            "of its time; docs/benchmarks.md). No effect on Metal.")
    recompute_attention: bool = opt(False, "MLX on the CPU, with fast_cpu_math: recompute attention's softmax in the "
                                           "backward at every length, not only from 1024 x 1024 scores per layer "
                                           "(compute.attention_block): another 0.22 GB less on the bench's LoRA "
                                           "step, for ~9% more time at 256 tokens and more at longer ones. Only "
                                           "where the C++ attention does not apply (it always recomputes). "
                                           "No effect on Metal.")
    frozen_panels: bool = opt(False, "MLX on the CPU, with fast_cpu_math and LoRA, where mlx-dpo's C++ kernels are "
                                     "built and OpenBLAS's own micro-kernel is found: pack each frozen weight once "
                                     "for it, in the forward's and the input gradient's layouts, instead of in every "
                                     "product (mlx_dpo/csrc/frozen_gemm.cpp). Costs twice the frozen linear "
                                     "weights' memory (0.79 GB more MLX peak on the bench's SmolLM2-135M step) "
                                     "for 4-7% less step time at 256 tokens and ~2% (within noise) at 1024 "
                                     "(docs/benchmarks.md). No effect on Metal.")


@dataclass
class LoggingConfig:
    output_dir: str = opt("outputs/dpo", "Where metrics.jsonl, checkpoints and the final model go.")
    save_total_limit: int = opt(3, "Keep at most this many checkpoints (the newest is never deleted).", min=1)
    wandb_project: Optional[str] = opt(None, "Weights & Biases project (needs `pip install wandb`).")
    wandb_run_name: Optional[str] = opt(None, "Weights & Biases run name.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = field(default="<defaults>", metadata=dict(internal=True))

    # Convenience accessors for the resolved model paths.
    @property
    def reference_path(self) -> str:
        return self.model.reference_model or self.model.base_model

    @property
    def policy_path(self) -> str:
        return self.model.policy_model or self.reference_path

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if not f.metadata.get("internal")}


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] = (),
                base_dir: Optional[Path] = None) -> Config:
    """Read, override (`section.key=value`), type-check and validate a YAML config.

    Relative file paths are resolved against `base_dir` (default: the current directory).
    """
    source = str(path) if path else "<defaults>"
    raw: dict = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    given = {}  # (section, key) -> the --set item: errors in its value name the --set, not the file
    for item in overrides:
        given[_apply_override(raw, item, source)] = item
    cfg = _build(raw, source, given)
    _resolve_paths(cfg, base_dir)
    _check_semantics(cfg)
    return cfg


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    cfg = _build(raw, source)
    _check_semantics(cfg)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last value without a word, so one of two edits would silently not apply)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with path.open(encoding="utf-8") as stream:  # a stream, so that error positions name the file
            raw = yaml.load(stream, Loader=_UniqueKeyLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections {sorted(SECTIONS)}")
    return raw


def _apply_override(raw: dict, item: str, source: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. training.beta=0.2")
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: section {parts[0]!r} must be a mapping")
    section[parts[1]] = _override_value(value)
    return parts[0], parts[1]


def _override_value(text: str) -> Any:
    """A --set value read as YAML (numbers, true/false, [lists]); text that YAML cannot read, or
    that holds a '#' (a comment to YAML, a character of the value on a command line), is taken
    as the string it is, so `data.train_file=*.jsonl` or `output_dir=runs/#3` mean what they say."""
    if not text.strip():
        return None
    if "#" in text:
        return text.strip()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text.strip()


def _build(raw: dict, source: str, given: Optional[dict] = None) -> Config:
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; allowed: {sorted(SECTIONS)}")
    sections = {}
    for name in SECTIONS:
        cls = typing.get_type_hints(Config)[name]
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping of keys")
        sections[name] = _build_section(cls, name, values, source, given or {})
    return Config(**sections, source=source)


def _build_section(cls, section: str, values: dict, source: str, given: dict):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(f'{section}.{k}' for k in sorted(unknown))}; "
                          f"allowed in {section}: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        item = given.get((section, name))
        where = f"--set {item}" if item else f"{source}: {section}.{name}"
        meta = fields[name].metadata
        if isinstance(value, bool) and {"on", "off"} <= set(meta.get("choices") or ()):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        kwargs[name] = _check_value(where, _coerce(where, hints[name], value), meta)
    return cls(**kwargs)


def _coerce(where: str, hint, value: Any) -> Any:
    """Match a YAML value to a field type. YAML 1.1 reads `1e-6` as a string, so numeric
    strings are accepted for float fields; bools are never taken for numbers."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    base = [a for a in args if a is not type(None)] if args else [hint]
    if int in base and str in base:  # int | "auto"
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise ConfigError(f"{where}: expected an integer or 'auto', got {value!r}")
    kind = base[0]
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return number
    if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if kind is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             list: "a list of strings"}
    raise ConfigError(f"{where}: expected {names.get(kind, kind)}, got {value!r}")


def _check_value(where: str, value: Any, meta) -> Any:
    if value is None or isinstance(value, (list, bool)) or value == "auto":
        return value
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(meta['choices'])}")
    bounds = [("min", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("max", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")]
    for key, ok, sign in bounds:
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{where}: {value!r} is out of range; it must be {sign} {bound}")
    return value


def _resolve_paths(cfg: Config, base_dir: Optional[Path]) -> None:
    """Make data files and local model folders absolute, so runs and resumes agree."""
    base = Path(base_dir) if base_dir else Path.cwd()

    def resolve(p: Optional[str]) -> Optional[str]:
        if p is None or Path(p).is_absolute():
            return p
        candidate = base / p
        # A model string that is not a local folder is a Hugging Face repo id: keep it.
        return str(candidate) if candidate.exists() else p

    for key in ("train_file", "validation_file"):
        value = getattr(cfg.data, key)
        if value is not None and not Path(value).is_absolute():
            setattr(cfg.data, key, str(base / value))
    for key in ("base_model", "reference_model", "policy_model"):
        setattr(cfg.model, key, resolve(getattr(cfg.model, key)))
    if base_dir is None and not Path(cfg.logging.output_dir).is_absolute():
        cfg.logging.output_dir = str(base / cfg.logging.output_dir)


def _check_semantics(cfg: Config) -> None:
    if not (cfg.model.base_model or cfg.model.reference_model or cfg.model.policy_model):
        raise ConfigError(f"{cfg.source}: model.base_model is required (a Hugging Face id or a local folder)")
    if not cfg.data.train_file:
        raise ConfigError(f"{cfg.source}: data.train_file is required (a JSONL file of preference pairs)")
    if cfg.training.warmup_steps >= cfg.training.max_steps and cfg.training.warmup_steps > 0:
        raise ConfigError(f"{cfg.source}: training.warmup_steps ({cfg.training.warmup_steps}) must be smaller "
                          f"than training.max_steps ({cfg.training.max_steps})")
    if cfg.training.batch_size != "auto" and cfg.training.batch_size < 1:
        raise ConfigError(f"{cfg.source}: training.batch_size must be >= 1 or 'auto'")
    split_shares(cfg.compute.split, f"{cfg.source}: compute.split")  # its count is checked at launch
    if cfg.model.lora_layers == 0:  # mlx-lm would read 0 as layers[-0:], i.e. every block
        raise ConfigError(f"{cfg.source}: model.lora_layers: 0 blocks would train nothing; "
                          "give -1 (every block) or a count >= 1")
    if cfg.model.lora_keys == []:
        raise ConfigError(f"{cfg.source}: model.lora_keys: an empty list adapts nothing; "
                          "leave the key out to adapt every linear layer")


HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # what a Hugging Face repo id can look like


def split_shares(text: str, where: str = "compute.split") -> Optional[list[float]]:
    """compute.split's shares as given (not normalized), or None for `auto`."""
    text = str(text).strip()
    if text == "auto":
        return None
    try:
        shares = [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a list of numbers like 0.65,0.35, nor auto") from None
    if any(not math.isfinite(s) or s <= 0 for s in shares):
        raise ConfigError(f"{where}: {text!r}: every share must be a positive number")
    return shares


def check_files(cfg: Config) -> None:
    """Fail early, before any model loads, when an input file or a local model folder is wrong."""
    for key in ("train_file", "validation_file"):
        value = getattr(cfg.data, key)
        if value is not None and not Path(value).is_file():
            what = "a folder, not a file" if Path(value).is_dir() else "file not found"
            raise ConfigError(f"{cfg.source}: data.{key}: {what}: {value}")
    for key in ("base_model", "reference_model", "policy_model"):
        value = getattr(cfg.model, key)
        if value is None:
            continue
        where, path = f"{cfg.source}: model.{key}: {value}", Path(value).expanduser()
        if path.is_file():
            raise ConfigError(f"{where} is a file; give an mlx-lm model folder (with config.json) "
                              "or a Hugging Face id")
        if path.is_dir() and not (path / "config.json").is_file():
            raise ConfigError(f"{where}: not an mlx-lm model folder (no config.json in it)")
        if not path.exists() and not HUB_ID.fullmatch(value):
            raise ConfigError(f"{where}: folder not found (and not a Hugging Face id, which looks "
                              "like 'org/name')")


def describe() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every config key: the source of docs/config.md."""
    rows = []
    for section, cls in typing.get_type_hints(Config).items():
        if section not in SECTIONS:
            continue
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f.metadata["help"]
            if f.metadata.get("choices"):
                help_text += f" One of: {', '.join(f.metadata['choices'])}."
            rows.append((f"{section}.{f.name}", str(f.type), default, help_text))
    return rows
