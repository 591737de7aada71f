"""SEDD (Lou et al. 2024) hub folders, e.g. louaaron/sedd-small and sedd-medium, on our `DDiT`.

The folder is what `PyTorchModelHubMixin.save_pretrained` wrote for louaaron/Score-Entropy-Discrete-Diffusion's
`SEDD` (model/transformer.py): `config.json` is the whole training config as a nested dict, without a
model_type, which we recognise by its shape (`tokens`, `graph`, `noise`, and `model.type` "ddit"); the weights
(`model.safetensors`, or `pytorch_model.bin` with allow_pickle) carry the network's own names, which are ours:

    vocab_embed.embedding, sigma_map.mlp.{0,2}.*, blocks.N.{norm1,attn_qkv,attn_out,norm2,mlp.0,mlp.2,
    adaLN_modulation}.*, output_layer.{norm_final,linear,adaLN_modulation}.*     -> the same names
    rotary_emb.inv_freq                                                          -> dropped (recomputed)

config: model.hidden_size / cond_dim / n_blocks / n_heads / length; vocabulary `tokens` (GPT-2's 50257) + 1
for the absorbing state [MASK] (graph.type "absorb", the only graph our mask-based samplers run); the network is
conditioned on sigma of the log-linear noise (noise.type "loglinear"), which DDiT computes from t.

SEDD's forward ends with its log-score parameterisation (`scale_by_sigma`: -log(e^sigma - 1) - log(V - 1), then
0 at the input token); that is `dlm.models.ddit.sedd_log_score`, outside the network, and `scale_by_sigma` is kept
in `CheckpointConfig.extra`. The checkpoint's process is `sedd-absorbing` (log-linear noise, eps 1e-3), whose
graph applies that same parameterisation (`AbsorbingGraph.log_score`), so SEDD's own samplers run it
(`sedd_analytic` by default, `sedd_euler`), as does the held-out bound. A checkpoint without `scale_by_sigma`
falls back to MDLM's ancestral sampler (softmax(logits) at a masked position is p(x0 | xt) either way).

    lm = DiffusionLM.from_pretrained("/models/sedd-small")     # + GPT-2's tokenizer.json in the folder
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlm.config import CheckpointConfig, ModelConfig
from dlm.formats.base import FORMATS, CheckpointError, Format, load_weights, renamer
from dlm.formats.mdlm import absorbing_sampling, gpt2_tokenizer


def rename(key: str) -> str | None:
    return None if key == "rotary_emb.inv_freq" else key  # upstream's persistent RoPE buffer; recomputed


def model_config(config: dict[str, Any], folder: Path) -> ModelConfig:
    graph, noise = config["graph"].get("type"), (config.get("noise") or {}).get("type")
    if graph != "absorb":
        raise CheckpointError(f"{folder}/config.json: graph.type={graph!r} is not supported; dlm runs SEDD's "
                              "absorbing graph ('absorb'), whose [MASK] state its samplers denoise")
    if noise != "loglinear":
        raise CheckpointError(f"{folder}/config.json: noise.type={noise!r} is not supported; dlm conditions SEDD on "
                              "the log-linear noise ('loglinear'), sigma(t) = -log(1 - (1 - 1e-3) t)")
    m = config["model"]
    absent = [k for k in ("hidden_size", "cond_dim", "n_blocks", "n_heads") if k not in m]
    if absent or not isinstance(config.get("tokens"), int):
        raise CheckpointError(f"{folder}/config.json lacks {absent or ['tokens']}: dlm reads the config of "
                              "louaaron/sedd-small (tokens, graph, noise, model.hidden_size / cond_dim / n_blocks / "
                              "n_heads / length)")
    d = m["hidden_size"]
    return ModelConfig(
        arch="ddit", vocab_size=config["tokens"] + 1, d_model=d, n_layers=m["n_blocks"], n_heads=m["n_heads"],
        d_ff=4 * d, max_len=m.get("length", 1024), dropout=float(m.get("dropout", 0.1)), time_dim=256,
        cond_dim=m["cond_dim"], time_conditioning=True, sigma_eps=1e-3,  # LogLinearNoise() of noise_lib.py
    )


@FORMATS.register("sedd")
class SEDDFormat(Format):
    model_types = ()  # the hub config has none; `matches` reads its shape

    def matches(self, config: dict[str, Any]) -> bool:
        model = config.get("model")
        return ("model_type" not in config and isinstance(model, dict) and model.get("type") == "ddit"
                and isinstance(config.get("graph"), dict) and "tokens" in config)

    def load(self, folder, config, dtype, device, allow_pickle):
        from dlm.config import GenerationConfig, ProcessConfig
        from dlm.models import build_model
        from dlm.processes.masked import PROCESSES

        scaled = bool(config["model"].get("scale_by_sigma", True))
        if scaled:  # SEDD's own graph, score and samplers (dlm.processes.sedd, dlm.sampling.sedd)
            family = PROCESSES.get("sedd-absorbing")
            process = ProcessConfig(process="sedd-absorbing", **family.defaults)
            sampling = GenerationConfig(max_new_tokens=128, steps=128, suppress_special=False, **family.sampling)
        else:  # an unscaled output is only defined up to the softmax: MDLM's sampler reads it as p(x0 | xt)
            process, sampling = ProcessConfig(process="masked", schedule="loglinear"), absorbing_sampling()
        cfg = CheckpointConfig(
            model=model_config(config, folder), process=process, sampling=sampling,
            extra={"source": str(folder), "model_type": "sedd", "graph": "absorb", "noise": "loglinear",
                   "scale_by_sigma": bool(config["model"].get("scale_by_sigma", True))},
        )
        tok = gpt2_tokenizer(folder, mask_id=cfg.model.vocab_size - 1, vocab_size=cfg.model.vocab_size)
        model = load_weights(folder, cfg.model, build_model, renamer(rename), dtype, device, allow_pickle)
        return model, cfg, tok
