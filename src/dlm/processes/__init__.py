"""Forward processes, one file per family, all registered in `PROCESSES` (which imports them on first lookup).

masked.py: the absorbing process of LLaDA / MDLM, the `ForwardProcess` base, `PROCESSES`, `build_process`;
sedd.py: SEDD's graphs (absorbing, uniform); d3pm.py: D3PM's discrete-time chains; block.py: block diffusion
(BD3LM). `dlm.process`, `dlm.graphs` and `dlm.d3pm` are the old import paths, kept as aliases.

    from dlm.processes import PROCESSES, build_process
    proc = build_process(ProcessConfig(process="sedd-uniform", schedule="geometric"), tokenizer)
"""

from dlm.processes.masked import PROCESSES, ForwardProcess, MaskedProcess, build_process, span_infill_example

__all__ = ["PROCESSES", "ForwardProcess", "MaskedProcess", "build_process", "span_infill_example"]
