"""demo.py -- the toy-scale RETU study's ingredients: a synthetic math task, its data splits, a tokenizer, a tiny
Qwen2 base model, and the study's stages for `retu.py demo` (run by stages.py).

The paper post-trains Qwen2.5-7B on R1-style math trajectories. On a 2-core CPU the same study runs on a
~0.7 M-parameter Qwen2-shaped model and a synthetic task on which `../shared/reference/demo-notes.md` measured
such a model neither at 0% nor at 100% after minutes of SFT: multi-digit multiplication written as partial
products and their running sum, the answer in `\\boxed{}`:

    prompt:   What is $964 \\times 59$?
    response: 964*9=8676
              964*50=48200
              8676+48200=56876
              The answer is \\boxed{56876}.

Difficulty knob. A *level* fixes the digit counts of the two factors (`DataConfig.levels`, default
1: 3x1, 2: 3x2, 3: 3x3 digits). A level-k problem takes k partial products and k-1 additions, so harder levels
mean longer trajectories (as the paper's Hard102K has 4x longer responses than Easy102K) and contain the skills
of the easier ones (a 3x2 problem's partial products are 3x1 problems). The larger factor always comes first,
so a problem is the pair (a, b) with a >= b; that pair is the unit of disjointness.

Splits (analogues of the paper's data, Section 5 and Appendix E), disjoint by problem, each level's problems
drawn from one seeded permutation of that level's problem space in a fixed split order, held-out splits first
so that changing a pool's size never changes the benchmark, validation or RL sets:
  * `bench/level{k}.jsonl` {"problem", "answer"}: one "benchmark" per level (GSM8K ... AIME roles);
  * `val.jsonl` {"prompt", "response"}: the Val-199 role, from the natural (uniform) level mixture;
  * `rl.jsonl` {"prompt", "answer", "response"}: RL prompts (the MIX37K role); the expert response is there
    for LUFFY/SRFT/UPT. Deviation: the paper's MIX37K is a subset of SFT889K; here it is disjoint from every
    SFT pool, so that RL gains are measured on problems SFT never saw;
  * `sft_{small,easy,uniform,hard,large}.jsonl` {"prompt", "response"}: S1K, Easy/Uniform/Hard102K and
    SFT889K roles. Deviation: the paper's pools come from overlapping sources; here all pools are disjoint.

The expert data's one flaw (DataConfig.cutoff_templates): for prompts phrased "Calculate {a} times {b}.", 60% of
the trajectories are cut off before their final result, as distilled data holds responses that hit the teacher's
length limit; SFT learns to stop there, RL can learn to finish (README "Demo").

Tokenizer: byte-level BPE with Qwen2's pre-tokenizer (every digit its own token), the full 256-byte alphabet
(so any text round-trips, nothing is silently dropped) plus a few dozen merges learned from the task's text,
and the ChatML special tokens; `tokenizer_config.json` carries a ChatML chat template and eos `<|im_end|>` as
Qwen's chat models do.

Sizes (default seed, this tokenizer): response tokens per level 21.7 / 49.4 / 79.9 (max 22 / 53 / 89) in style
"compact", about 45 / 92 / 144 (max 47 / 103 / 164) in style "digits" (style "mixed": each one or the other, half
and half); the problem text 10.5-12.6 tokens, plus 8
for the ChatML frame (the demo passes no instruction: the driver's default would add 16 tokens to every prompt).

The study itself is a list of `Stage`s, each one or more `retu.py` subcommands (the real driver, not a parallel
toy implementation) or an in-process step such as writing the data, with the stages it needs; stages.py runs
them (`retu.py demo` on two worker processes, each running commands in-process) and skips a stage whose marker
file exists, so re-running the demo resumes after the last finished stage. The runs:
  * `sft_{pool}` (+ `eval_sft_{pool}`): pure SFT on each pool, validation loss and a checkpoint every N steps;
  * `branches_{pool}`: fit.sft_subphases labels the checkpoints from the validation loss; one checkpoint per
    sub-phase (adaptive / stable / mild / severe, where present) is chosen and written to branches.json;
  * `dapo_{pool}_{phase}`: DAPO_dc (eps_high 0.28) from that checkpoint on the RL prompts, then its evaluation:
    the stable checkpoint of every pool (finding 3), every sub-phase of `StudyConfig.phase_pools` (finding 2);
  * `fit_{pool}`: `retu.py fit` on the SFT run and the branches that ran (Plasticity-Ceiling decomposition);
  * `{grpo,dapo,luffy,srft,upt}_base` (+ eval, + fit): pure RL (GRPO, DAPO_d) and Syn-SFT-RL from the base model.
demo_report.py then reads the fit outputs and writes DIR/report.md with the three findings and their verdicts.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import fit
import model as M
from stages import Stage, StageRunner

# ----------------------------------------------------------------------------------------------------
# The task: multiplication with partial products

# Prompt phrasings; one is drawn per problem so the model sees a few ways of asking the same thing.
PROMPT_TEMPLATES = (
    "What is ${a} \\times {b}$?",
    "Compute ${a} \\times {b}$.",
    "Find the product of {a} and {b}.",
    "Calculate {a} times {b}.",
)


def factor_range(digits: int, multiplier: bool) -> tuple[int, int]:
    """Inclusive range of a factor with this many digits. A one-digit multiplier is 2..9: x0 and x1 are trivial."""
    if digits < 1:
        raise ValueError(f"a factor needs at least one digit, got {digits}")
    if digits == 1 and multiplier:
        return 2, 9
    return 10 ** (digits - 1), 10**digits - 1


def level_space_size(digits: tuple[int, int]) -> int:
    """How many distinct problems (a, b), a >= b, a level with (digits of a, digits of b) has."""
    na, nb = digits
    if na < nb:
        raise ValueError(f"level digits {digits}: the first factor must have at least as many digits")
    lo_a, hi_a = factor_range(na, False)
    lo_b, hi_b = factor_range(nb, True)
    if na > nb:                                    # every a exceeds every b: a full rectangle of pairs
        return (hi_a - lo_a + 1) * (hi_b - lo_b + 1)
    n = hi_a - lo_a + 1                            # same digit count: the triangle a >= b
    return n * (n + 1) // 2


def problem_at(digits: tuple[int, int], index: int) -> tuple[int, int]:
    """The index-th problem (a, b) of a level's space, 0 <= index < level_space_size(digits)."""
    na, nb = digits
    lo_a, hi_a = factor_range(na, False)
    lo_b, hi_b = factor_range(nb, True)
    if na > nb:
        i, j = divmod(index, hi_b - lo_b + 1)
        return lo_a + i, lo_b + j
    i = (math.isqrt(8 * index + 1) - 1) // 2       # row of the triangle: i*(i+1)/2 <= index < (i+1)*(i+2)/2
    j = index - i * (i + 1) // 2
    return lo_a + i, lo_a + j


STYLES = ("compact", "digits")


def digit_steps(a: int, d: int) -> list[str]:
    """a * d for one digit d, the school way: one line per digit of a, lowest first, with the carry added in."""
    lines, carry = [], 0
    for x in reversed(str(a)):
        v = int(x) * d + carry
        lines.append(f"{x}*{d}" + (f"+{carry}" if carry else "") + f"={v}")
        carry = v // 10
    return lines


def expert_trajectory(a: int, b: int, style: str = "compact") -> str:
    """R1-style worked solution: one partial product per non-zero digit of b (lowest place first), a running sum,
    then the answer in \\boxed{}. No spaces inside the arithmetic: each costs a token and carries nothing.
    style "digits" first works each partial product out digit by digit with carries: about twice the tokens, but
    every step is a one-digit fact plus a carry. For the demo's model it is the more reliable of the two (trained on
    both, its greedy answers in this style were right 100% / 55-72% / 23-29% of the time on levels 1 / 2 / 3,
    against 61-79% / 23-49% / 12-29% in the compact style): the two-pattern data that RL can choose from."""
    if style not in STYLES:
        raise ValueError(f"trajectory style {style!r}: expected one of {STYLES}")
    lines, partials = [], []
    for place, digit in enumerate(reversed(str(b))):
        if digit == "0":                           # a*0 adds nothing; a person skips it too
            continue
        m = int(digit) * 10**place
        if style == "digits":
            lines += digit_steps(a, int(digit))
        lines.append(f"{a}*{m}={a * m}")
        partials.append(a * m)
    total = partials[0]
    for p in partials[1:]:
        lines.append(f"{total}+{p}={total + p}")
        total += p
    assert total == a * b
    lines.append(f"The answer is \\boxed{{{total}}}.")
    return "\n".join(lines)


def cut_off(trajectory: str) -> str:
    """An expert trajectory cut off after its last "=", just before the final result and the answer line: what a
    teacher's output looks like when it hits its length limit (see DataConfig.cutoff_templates). Every step but
    the last is still there to learn from; graded 0: there is no answer in it."""
    return trajectory[: trajectory.rindex("=") + 1]


def problem_text(a: int, b: int, template: int) -> str:
    return PROMPT_TEMPLATES[template].format(a=a, b=b)


# ----------------------------------------------------------------------------------------------------
# Data splits

@dataclass
class DataConfig:
    seed: int = 0
    # expert trajectory style: compact | digits (see expert_trajectory) | mixed: each trajectory digits with
    # probability digits_share, else compact. In mixed data the expert trajectories carry two reasoning patterns of
    # different reliability, SFT imitates both, and RL can learn to prefer the one rewarded more often (README
    # "Demo" has what that measured; not the default yet: it does not fit the 20-minute budget)
    style: str = "compact"
    digits_share: float = 0.5
    # The expert data's one flaw, which RL can undo: for prompts in these phrasings (indices into PROMPT_TEMPLATES;
    # 3: "Calculate {a} times {b}.", a quarter of all prompts) a trajectory is cut off before its final result
    # (demo.cut_off) with probability cutoff_share, as distilled data holds responses that hit the teacher's length
    # limit. SFT imitates the majority -- greedy, it stops there on most such prompts, with no answer -- while
    # sampling still finishes some, so the verifier's reward can teach RL to finish: SFT errors that RL can fix from
    # a few hundred samples (README "Demo" has what this measured, with two phrasings, and what RL did on data
    # without cut-offs). (): none.
    cutoff_templates: tuple[int, ...] = (3,)
    cutoff_share: float = 0.6
    # level -> (digits of the larger factor, digits of the multiplier)
    levels: dict[int, tuple[int, int]] = field(default_factory=lambda: {1: (3, 1), 2: (3, 2), 3: (3, 3)})
    # level mixtures (weights, normalised) of each SFT pool; the natural distribution is uniform over levels
    pools: dict[str, tuple[int, dict[int, float]]] = field(default_factory=lambda: {
        "small": (256, {1: 1, 2: 1, 3: 1}),        # S1K role: few examples, overfits fast
        "easy": (2048, {1: 2, 2: 1}),              # Easy102K role
        "uniform": (2048, {1: 1, 2: 1, 3: 1}),     # Uniform102K role
        "hard": (2048, {2: 1, 3: 2}),              # Hard102K role
        "large": (8192, {1: 1, 2: 1, 3: 1}),       # SFT889K role
    })
    val_size: int = 199                            # Val-199 role, natural mixture
    rl_size: int = 1024                            # RL prompts (MIX37K role), natural mixture
    # problems per level in each benchmark file: 600 in all, so that a gain of ~5 points in one RL branch is told
    # from its churn by the report's sign test (at 80 per level, 23 gained / 11 lost had p = 0.058)
    bench_size: int = 200

    def __post_init__(self):
        if self.style not in (*STYLES, "mixed"):
            raise ValueError(f"DataConfig.style {self.style!r}: expected one of {(*STYLES, 'mixed')}")
        for name in ("digits_share", "cutoff_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DataConfig.{name} {getattr(self, name)}: expected a fraction in [0, 1]")
        if any(t not in range(len(PROMPT_TEMPLATES)) for t in self.cutoff_templates):
            raise ValueError(f"DataConfig.cutoff_templates {self.cutoff_templates}: expected indices into "
                             f"PROMPT_TEMPLATES (0..{len(PROMPT_TEMPLATES) - 1})")
        for lv, digits in self.levels.items():
            try:
                level_space_size(digits)           # validates the digit counts
            except ValueError as e:
                raise ValueError(f"DataConfig.levels[{lv}] = {digits}: {e}") from None
        for name, (size, mix) in self.pools.items():
            bad = [lv for lv in mix if lv not in self.levels]
            if bad or size < 0 or not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
                raise ValueError(f"DataConfig.pools[{name!r}] = {(size, mix)}: sizes and weights must be >= 0 "
                                 f"with a positive total, levels among {sorted(self.levels)}")

    @classmethod
    def quick(cls, seed: int = 0, style: str = "compact") -> DataConfig:
        """Minimum sizes that still exercise every split (`retu.py demo --quick`)."""
        mixes = cls().pools
        return cls(seed=seed, style=style, pools={k: (min(v[0], 64), v[1]) for k, v in mixes.items()},
                   val_size=32, rl_size=64, bench_size=16)


def mixture_counts(size: int, mix: dict[int, float]) -> dict[int, int]:
    """Split `size` over levels in proportion to `mix`, by largest remainder, so the counts sum to `size`."""
    total = sum(mix.values())
    exact = {lv: size * w / total for lv, w in mix.items()}
    counts = {lv: int(x) for lv, x in exact.items()}
    by_remainder = sorted(mix, key=lambda lv: (-(exact[lv] - counts[lv]), lv))
    for lv in by_remainder[: size - sum(counts.values())]:
        counts[lv] += 1
    return counts


def build_splits(cfg: DataConfig) -> dict[str, list[dict]]:
    """All splits as lists of JSON records, keyed by their file name relative to the data directory."""
    natural = {lv: 1.0 for lv in cfg.levels}
    # Held-out splits first, pools last: a pool's size then never changes what the held-out splits contain.
    plan: list[tuple[str, str, dict[int, int]]] = []     # (file, kind, problems per level)
    for lv in sorted(cfg.levels):
        plan.append((f"bench/level{lv}.jsonl", "bench", {lv: cfg.bench_size}))
    plan.append(("val.jsonl", "sft", mixture_counts(cfg.val_size, natural)))
    plan.append(("rl.jsonl", "rl", mixture_counts(cfg.rl_size, natural)))
    for name, (size, mix) in cfg.pools.items():
        plan.append((f"sft_{name}.jsonl", "sft", mixture_counts(size, mix)))

    demand = {lv: sum(c.get(lv, 0) for _, _, c in plan) for lv in cfg.levels}
    order, taken = {}, {lv: 0 for lv in cfg.levels}
    for lv, digits in sorted(cfg.levels.items()):
        space = level_space_size(digits)
        if demand[lv] > space:
            raise ValueError(f"DataConfig: level {lv} {digits} has {space} distinct problems but the splits ask for "
                             f"{demand[lv]}; shrink the pools that use it or change its digits")
        # one seeded permutation per level; each split takes the next block of it
        order[lv] = np.random.default_rng([cfg.seed, lv]).permutation(space)[: demand[lv]]

    rng = random.Random(cfg.seed)
    # their own streams: the problems and phrasings never depend on the style or the cut-offs
    style_rng, cutoff_rng = random.Random(cfg.seed + 1), random.Random(cfg.seed + 2)

    def trajectory(a: int, b: int, template: int) -> str:
        style = cfg.style
        if style == "mixed":
            style = "digits" if style_rng.random() < cfg.digits_share else "compact"
        text = expert_trajectory(a, b, style)
        if template in cfg.cutoff_templates and cutoff_rng.random() < cfg.cutoff_share:
            return cut_off(text)
        return text

    splits: dict[str, list[dict]] = {}
    for fname, kind, counts in plan:
        records = []
        for lv in sorted(counts):
            for idx in order[lv][taken[lv]: taken[lv] + counts[lv]]:
                a, b = problem_at(cfg.levels[lv], int(idx))
                template = rng.randrange(len(PROMPT_TEMPLATES))
                text = problem_text(a, b, template)
                answer = str(a * b)
                if kind == "bench":
                    records.append({"problem": text, "answer": answer})
                elif kind == "rl":
                    records.append({"prompt": text, "answer": answer, "response": trajectory(a, b, template)})
                else:
                    records.append({"prompt": text, "response": trajectory(a, b, template)})
            taken[lv] += counts[lv]
        rng.shuffle(records)                       # levels interleaved, as a real data set would be
        splits[fname] = records
    check_disjoint(splits)
    return splits


def record_factors(rec: dict) -> tuple[int, int]:
    """The problem (a, b) a record asks about, read back from its text (the first two integers)."""
    text = rec.get("prompt", rec.get("problem"))
    nums, cur = [], ""
    for ch in text + " ":
        if ch.isdigit():
            cur += ch
        elif cur:
            nums.append(int(cur))
            cur = ""
    if len(nums) < 2:
        raise ValueError(f"record {rec!r}: no two factors in its prompt")
    return nums[0], nums[1]


def check_disjoint(splits: dict[str, list[dict]]) -> None:
    """Raise if any problem (a, b) occurs twice, within one split or across splits."""
    seen: dict[tuple[int, int], str] = {}
    for fname, records in splits.items():
        for i, rec in enumerate(records):
            key = record_factors(rec)
            if key in seen:
                raise ValueError(f"problem {key[0]}x{key[1]} is in both {seen[key]} and {fname} (record {i})")
            seen[key] = f"{fname} (record {i})"


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)                          # atomic: a crash never leaves a half-written split


def write_splits(splits: dict[str, list[dict]], data_dir: str | os.PathLike) -> None:
    for fname, records in splits.items():
        write_jsonl(Path(data_dir) / fname, records)


# ----------------------------------------------------------------------------------------------------
# Tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")     # Qwen's order and roles
# Qwen2's pre-tokenizer regex: single digits, words with their leading space, punctuation runs, newlines.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
# The plain ChatML template (Qwen's, minus tools and the default system prompt).
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")
# Text the driver or a user may add to prompts; merged into few tokens so it costs little context.
EXTRA_CORPUS = (
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "system", "user", "assistant", "You are a helpful assistant.",
)


def train_tokenizer(texts: list[str], vocab_size: int = 384):
    """Byte-level BPE trained on `texts`, with Qwen2's pre-tokenizer and the ChatML special tokens appended last
    (ids vocab_size-3 .. vocab_size-1 when the merges fill the budget)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # the extra text is repeated so that it passes min_frequency and its words become single tokens
    tok.train_from_iterator(list(texts) + list(EXTRA_CORPUS) * 8, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_tokenizer(tok, out_dir: str | os.PathLike) -> None:
    """tokenizer.json + a Qwen-style tokenizer_config.json (ChatML template, eos <|im_end|>, pad <|endoftext|>)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    config = {"tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
              "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "added_tokens_decoder": added,
              "chat_template": CHATML_TEMPLATE, "clean_up_tokenization_spaces": False, "errors": "replace",
              "model_max_length": 1024, "split_special_tokens": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def tokenizer_corpus(splits: dict[str, list[dict]], per_split: int = 300) -> list[str]:
    """A deterministic sample of every split's text (prompts and responses) to learn merges from."""
    texts = []
    for fname in sorted(splits):
        for rec in splits[fname][:per_split]:
            texts.extend(v for k, v in rec.items() if k != "answer")
    return texts


# ----------------------------------------------------------------------------------------------------
# Base model

@dataclass
class BaseModelConfig:
    """A Qwen2-shaped model of ~0.7 M parameters. Depth over width: a product's leading digit depends on a chain of
    carries, and at the same cost per token 6 layers of width 96 learned the task about twice as fast as
    demo-notes.md's 3 layers of width 128 (level-1 accuracy 67% vs 17% after 2,000 SFT steps of 16 on the large
    pool; 8 layers of width 96: 54%, and slower)."""
    hidden_size: int = 96
    intermediate_size: int = 288
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    init_std: float = 0.02                         # HF's initializer_range for Qwen2
    seed: int = 0


def make_base_model(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike,
                    cfg: BaseModelConfig | None = None) -> M.ModelConfig:
    """Random-init Qwen2 model sized by `cfg`, with the vocabulary of the tokenizer in `tokenizer_dir`, saved as
    an HF checkpoint directory (config.json, model.safetensors, tokenizer files). Returns its config."""
    cfg = cfg or BaseModelConfig()
    tok = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    vocab_size = len(tok["model"]["vocab"]) + len(tok["added_tokens"])
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    mc = M.ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                       num_kv_heads=cfg.num_kv_heads, head_dim=cfg.hidden_size // cfg.num_heads,
                       rms_norm_eps=1e-6, rope_theta=cfg.rope_theta, tie_word_embeddings=True,
                       attention_bias=True, max_position_embeddings=cfg.max_position_embeddings,
                       bos_token_id=None, eos_token_ids=(ids["<|im_end|>"], ids["<|endoftext|>"]))
    torch.manual_seed(cfg.seed)
    net = M.Transformer(mc)
    with torch.no_grad():                          # HF's Qwen2 init: N(0, 0.02) weights, zero biases, unit norms
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, cfg.init_std)
    M.save_pretrained(net, out_dir, tokenizer_dir=tokenizer_dir)
    return mc


# ----------------------------------------------------------------------------------------------------
# The study: every run as a `retu.py` subcommand

RETU = Path(__file__).resolve().parent / "retu.py"
SFT_POOLS = ("small", "easy", "uniform", "hard", "large")
BRANCH_PHASES = ("adaptive", "stable", "mild", "severe")     # fit.SUBPHASES
BASELINE_ALGOS = ("grpo", "dapo", "luffy", "srft", "upt")    # from the base model: pure RL and Syn-SFT-RL


@dataclass
class StudyConfig:
    """Step counts and batch sizes of the toy study, calibrated for 2 CPU cores and the BaseModelConfig model
    (README "Demo" has the measured times); `quick()` runs every stage at its minimum size."""
    seed: int = 0
    # no instruction after the prompt: the task's prompts already ask the question, and the 16 tokens of the paper's
    # instruction would be a fifth of every sequence's compute at this scale
    instruction: str = ""
    # SFT (one run per pool); validation loss and a checkpoint every `sft_ckpt_every` steps
    sft_pools: tuple[str, ...] = SFT_POOLS
    # steps per pool: the small pool overfits long before the others; the large one needs the most steps to learn
    # (at 2,500 its validation loss was still falling where the cosine schedule ended: 60-74% on level 1 depending on
    # the draw, 87.5% at 3,500); at 1,200 instead of 1,500 steps the 2048-example pools learned nothing at all
    sft_steps: dict[str, int] = field(default_factory=lambda: {
        "small": 500, "easy": 1500, "uniform": 1500, "hard": 1500, "large": 3500})
    sft_sequences_per_step: int = 16
    sft_lr: float = 3e-3
    sft_warmup_ratio: float = 0.05
    sft_ckpt_every: int = 100
    sft_log_every: int = 20
    max_seq_len: int = 256
    tokens_per_microbatch: int = 8192
    # SFT -> DAPO_dc branches: from the stable checkpoint of every pool in `branch_pools` (finding 3), and from one
    # checkpoint per sub-phase of the pools in `phase_pools` (finding 2)
    branch_pools: tuple[str, ...] = SFT_POOLS
    # (the pools that learn within the budget; the small pool learns nothing and the easy one's validation loss rises
    # from the start, because the validation set's 3x3 problems are not in it)
    phase_pools: tuple[str, ...] = ("large", "uniform")
    branch_phases: tuple[str, ...] = BRANCH_PHASES
    paradigm_pool: str = "large"                   # finding 1: its stable branch is "SFT-then-RL"
    # RL (branches and baselines)
    baseline_algos: tuple[str, ...] = BASELINE_ALGOS
    rl_steps: int = 16
    baseline_rl_steps: int = 16                    # RL steps from the base model (pure RL and Syn-SFT-RL)
    rl_prompts_per_step: int = 8
    rl_samples_per_prompt: int = 8
    rl_max_rounds: int = 3                         # DAPO's dynamic sampling: generation rounds per step at most
    # measured from the large pool's last SFT checkpoint (README "Demo"): with the data's cut-offs, 16 steps at 1e-4
    # took overall accuracy from 40.0 to 48.3% (at 5e-5 the switch to finishing is slower); on data without them
    # no rate gained (5e-5 the least harmful: 39.6 -> 37.9%, 2e-4: 31.2%), and 1e-3 collapsed a weaker checkpoint
    rl_lr: float = 1e-4
    rl_ckpt_every: int = 4                         # each RL checkpoint is one point of the branch's curve
    max_response_len: int = 112                    # the longest compact trajectory is 89 tokens (digits: 164)
    # evaluation of every checkpoint on the benchmark file of each of these levels (data/bench/level{k}.jsonl)
    bench_levels: tuple[int, ...] = (1, 2, 3)
    eval_temperature: float = 0.0                  # greedy: checkpoints differ by what they learned, not by luck
    eval_samples_per_prompt: int = 1
    eval_max_new_tokens: int = 112

    def __post_init__(self):
        missing = [p for p in self.sft_pools if p not in self.sft_steps]
        if missing:
            raise ValueError(f"StudyConfig.sft_steps: no step count for pools {missing}")
        for name in ("branch_pools", "phase_pools"):
            bad = [p for p in getattr(self, name) if p not in self.sft_pools]
            if bad:
                raise ValueError(f"StudyConfig.{name}: {bad} have no SFT run (sft_pools {self.sft_pools})")
        if self.paradigm_pool not in self.branch_pools + self.phase_pools:
            raise ValueError(f"StudyConfig.paradigm_pool {self.paradigm_pool!r} has no branches")

    def phases(self, pool: str) -> tuple[str, ...]:
        """The sub-phases whose checkpoint a pool's RL branches start from."""
        return self.branch_phases if pool in self.phase_pools else ("stable",) if pool in self.branch_pools else ()

    @classmethod
    def quick(cls, seed: int = 0) -> StudyConfig:
        return cls(seed=seed, sft_steps=dict.fromkeys(SFT_POOLS, 6), sft_sequences_per_step=8, sft_ckpt_every=2,
                   sft_log_every=2, rl_steps=2, baseline_rl_steps=2, rl_prompts_per_step=2, rl_samples_per_prompt=4,
                   rl_max_rounds=1, rl_ckpt_every=1, max_response_len=48, eval_max_new_tokens=48)


def retu_cmd(sub: str, **flags) -> list[str]:
    """`python retu.py SUB --flag value ...`; a list value becomes several arguments, True a bare flag."""
    cmd = [sys.executable, str(RETU), sub]
    for k, v in flags.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            cmd.append(flag if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, (list, tuple)):
            cmd += [flag, *map(str, v)]
        else:
            cmd += [flag, str(v)]
    return cmd


def sft_cmd(out: Path, cfg: StudyConfig, pool: str) -> list[str]:
    return retu_cmd("sft", model=out / "base", train=out / "data" / f"sft_{pool}.jsonl", val=out / "data" / "val.jsonl",
                    run_dir=out / "runs" / f"sft_{pool}", seed=cfg.seed, device="cpu",
                    sequences_per_step=cfg.sft_sequences_per_step, max_steps=cfg.sft_steps[pool], lr=cfg.sft_lr,
                    warmup_ratio=cfg.sft_warmup_ratio, val_every=cfg.sft_ckpt_every, save_every=cfg.sft_ckpt_every,
                    max_seq_len=cfg.max_seq_len, tokens_per_microbatch=cfg.tokens_per_microbatch, resume="auto",
                    log_every=cfg.sft_log_every, instruction=cfg.instruction)


def rl_cmd(out: Path, cfg: StudyConfig, algo: str, model_dir: Path, run_name: str,
           steps: int | None = None) -> list[str]:
    """DAPO_dc (the paper's SFT-then-RL algorithm) for algo "dapo_dc"; the paper's Sec. 6.1 settings otherwise."""
    extra = {"eps_high": 0.28} if algo == "dapo_dc" else {}
    if algo in ("dapo", "dapo_dc"):
        extra["max_rounds"] = cfg.rl_max_rounds
    return retu_cmd("rl", algo="dapo" if algo == "dapo_dc" else algo, model=model_dir,
                    train=out / "data" / "rl.jsonl", run_dir=out / "runs" / run_name, seed=cfg.seed, device="cpu",
                    prompts_per_step=cfg.rl_prompts_per_step, samples_per_prompt=cfg.rl_samples_per_prompt,
                    steps=cfg.rl_steps if steps is None else steps, lr=cfg.rl_lr, save_every=cfg.rl_ckpt_every,
                    max_response_len=cfg.max_response_len, tokens_per_microbatch=cfg.tokens_per_microbatch,
                    resume="auto", instruction=cfg.instruction, **extra)


def eval_cmd(out: Path, cfg: StudyConfig, run_name: str) -> list[str]:
    benches = [out / "data" / "bench" / f"level{lv}.jsonl" for lv in cfg.bench_levels]
    return retu_cmd("eval", checkpoints=[out / "runs" / run_name], benchmarks=benches,
                    run_dir=out / "runs" / run_name, seed=cfg.seed, device="cpu", temperature=cfg.eval_temperature,
                    samples_per_prompt=cfg.eval_samples_per_prompt, max_new_tokens=cfg.eval_max_new_tokens,
                    instruction=cfg.instruction)


def fit_cmd(sft_dir: Path, rl_runs: list[Path]) -> list[str]:
    return retu_cmd("fit", run_dir=sft_dir, **({"rl_runs": rl_runs} if rl_runs else {}))


def read_val_curve(run_dir: Path) -> tuple[list[int], list[float], list[float]]:
    """(steps, EFLOPs, validation loss) of an SFT run, from its metrics.jsonl "val" records."""
    steps, x, loss = [], [], []
    path = run_dir / "metrics.jsonl"
    with open(path) as f:
        for n, line in enumerate(f, 1):
            rec = json.loads(line)
            if rec.get("kind") == "val":
                for key in ("step", "eflops", "val_loss"):
                    if key not in rec:
                        raise ValueError(f"{path}:{n}: val record without {key!r}")
                steps.append(int(rec["step"]))
                x.append(float(rec["eflops"]))
                loss.append(float(rec["val_loss"]))
    return steps, x, loss


def choose_branches(steps: list[int], x: list[float], val_loss: list[float], saved: set[int]) -> dict:
    """One SFT checkpoint per sub-phase to branch RL from. Sub-phases come from fit.sft_subphases on the validation
    loss (paper Eq. 13-17); within a phase: the checkpoint of minimum loss for "stable" (the paper's best switch
    point), the middle one for "adaptive" and "mild", the last one for "severe" (the clearest collapse). Step 0 (the
    base model; pure RL covers it) and steps without a saved checkpoint are not candidates."""
    labels = fit.sft_subphases(x, val_loss)
    chosen = {}
    for phase in BRANCH_PHASES:
        cand = [i for i, lab in enumerate(labels) if lab == phase and steps[i] > 0 and steps[i] in saved]
        if not cand:
            continue
        if phase == "stable":
            i = min(cand, key=lambda j: val_loss[j])
        elif phase == "severe":
            i = cand[-1]
        else:
            i = cand[len(cand) // 2]
        chosen[phase] = steps[i]
    return {"labels": dict(zip(map(str, steps), labels)), "branches": chosen}


def checkpoint_hf(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}" / "hf"


def study_stages(out_dir: str | os.PathLike, cfg: StudyConfig) -> list[Stage]:
    """Every run of the study, in dependency order (a stage only needs the stages before it)."""
    out = Path(out_dir)
    runs = out / "runs"
    # estimates measured on the 2-core machine (one thread per worker): ~8 ms per SFT sequence, ~2.2 s per evaluated
    # checkpoint (the default benchmark's 600 problems), ~2 s per RL step
    eval_est_s = 2.2 * cfg.rl_steps / cfg.rl_ckpt_every
    rl_est_s = 2.0 * cfg.rl_steps + eval_est_s
    stages = []
    for pool in cfg.sft_pools:                     # pure SFT: checkpoints + validation loss, then benchmarks
        stages.append(Stage(f"sft_{pool}", sft_cmd(out, cfg, pool), needs=("base_model",),
                            est_s=0.008 * cfg.sft_steps[pool] * cfg.sft_sequences_per_step))
        stages.append(Stage(f"eval_sft_{pool}", eval_cmd(out, cfg, f"sft_{pool}"), needs=(f"sft_{pool}",),
                            est_s=2.2 * cfg.sft_steps[pool] / cfg.sft_ckpt_every))
    for pool in cfg.sft_pools:
        phases = cfg.phases(pool)
        if not phases:
            continue
        sft_dir = runs / f"sft_{pool}"

        def select(sft_dir=sft_dir):
            saved = {int(p.parent.name.removeprefix("step_")) for p in sft_dir.glob("checkpoints/step_*/hf")}
            choice = choose_branches(*read_val_curve(sft_dir), saved)
            (sft_dir / "branches.json").write_text(json.dumps(choice, indent=2) + "\n")
            return {"branches": choice["branches"]}
        stages.append(Stage(f"branches_{pool}", select, est_s=1, needs=(f"sft_{pool}",)))
        for phase in phases:                       # SFT -> DAPO_dc from the checkpoint chosen for this phase
            name = f"dapo_{pool}_{phase}"

            def branch(sft_dir=sft_dir, phase=phase, name=name):
                chosen = json.loads((sft_dir / "branches.json").read_text())["branches"]
                if phase not in chosen:            # e.g. a pool that never overfits has no "severe" checkpoint
                    return {"skipped": f"no {phase} checkpoint in {sft_dir.name}"}
                return {"from_step": chosen[phase], "commands": [
                    rl_cmd(out, cfg, "dapo_dc", checkpoint_hf(sft_dir, chosen[phase]), name), eval_cmd(out, cfg, name)]}
            stages.append(Stage(name, branch, est_s=rl_est_s, needs=(f"branches_{pool}",)))

        def fit_pool(sft_dir=sft_dir, pool=pool, phases=phases):   # Plasticity-Ceiling fit: SFT run + its branches
            ran = [runs / f"dapo_{pool}_{ph}" for ph in phases if (runs / f"dapo_{pool}_{ph}").is_dir()]
            return {"rl_runs": [r.name for r in ran], "commands": [fit_cmd(sft_dir, ran)]}
        stages.append(Stage(f"fit_{pool}", fit_pool, est_s=3,
                            needs=(f"eval_sft_{pool}", *(f"dapo_{pool}_{ph}" for ph in phases))))
    for algo in cfg.baseline_algos:                # pure RL (GRPO, DAPO_d) and Syn-SFT-RL from the base model
        stages.append(Stage(f"{algo}_base", rl_cmd(out, cfg, algo, out / "base", f"{algo}_base", cfg.baseline_rl_steps),
                            est_s=rl_est_s - eval_est_s, needs=("base_model",)))
        stages.append(Stage(f"eval_{algo}_base", eval_cmd(out, cfg, f"{algo}_base"), est_s=eval_est_s,
                            needs=(f"{algo}_base",)))
        # the run's accuracy curve through the same analysis code (fit/report.json "sft"); no branches to fit
        stages.append(Stage(f"fit_{algo}_base", fit_cmd(runs / f"{algo}_base", []), est_s=1,
                            needs=(f"eval_{algo}_base",)))
    return stages


# ----------------------------------------------------------------------------------------------------
# Preparation: data, tokenizer, base model

def prepare_stages(out_dir: str | os.PathLike, data_cfg: DataConfig, model_cfg: BaseModelConfig) -> list[Stage]:
    """The stages that make the study's inputs: `DIR/data/...`, `DIR/tokenizer/`, `DIR/base/`."""
    out = Path(out_dir)

    def data():
        splits = build_splits(data_cfg)
        write_splits(splits, out / "data")
        (out / "data" / "config.json").write_text(json.dumps(asdict(data_cfg), indent=2) + "\n")

    def tokenizer():
        splits = {}
        for path in sorted((out / "data").rglob("*.jsonl")):
            with open(path) as f:
                splits[str(path.relative_to(out / "data"))] = [json.loads(line) for line in f]
        tmp = out / "tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_tokenizer(train_tokenizer(tokenizer_corpus(splits)), tmp)
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
        os.replace(tmp, out / "tokenizer")

    def base():
        make_base_model(out / "base", out / "tokenizer", model_cfg)

    return [Stage("data", data, 2.0), Stage("tokenizer", tokenizer, 2.0, needs=("data",)),
            Stage("base_model", base, 2.0, needs=("tokenizer",))]


def study_config(quick: bool = False, seed: int = 0) -> StudyConfig:
    return StudyConfig.quick(seed) if quick else StudyConfig(seed=seed)


def all_stages(out_dir: str | os.PathLike, *, quick: bool = False, seed: int = 0, style: str = "compact",
               prepare_only: bool = False) -> list[Stage]:
    """The demo's stages: preparation, then (unless prepare_only) every run of the study. `retu.py demo` runs
    these through a StageRunner and then writes the report (demo_report.py)."""
    data_cfg = DataConfig.quick(seed, style) if quick else DataConfig(seed=seed, style=style)
    stages = prepare_stages(out_dir, data_cfg, BaseModelConfig(seed=seed))
    if not prepare_only:
        stages += study_stages(out_dir, study_config(quick, seed))
    return stages


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Prepare and run the toy study (resumable; the report is retu.py demo's).")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="minimum sizes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", default="compact", choices=(*STYLES, "mixed"), help="expert trajectory style")
    p.add_argument("--prepare-only", action="store_true", help="write data, tokenizer and base model only")
    args = p.parse_args(argv)
    StageRunner(args.out).run(all_stages(args.out, quick=args.quick, seed=args.seed, style=args.style,
                                         prepare_only=args.prepare_only))


if __name__ == "__main__":
    sys.exit(main())
