"""Forward processes, one file per family, registered in `dlm.process.PROCESSES` when imported.

block.py: block diffusion (BD3LM). The masked process and SEDD's / D3PM's still live in dlm.process, dlm.graphs
and dlm.d3pm.
"""
