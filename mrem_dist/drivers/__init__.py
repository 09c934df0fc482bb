"""One driver per way of running a method; `mrem_dist.runner.execute` picks it.

- single.py: PTQ and the one-process reconstruction methods (REM, LKD, MREM-S);
- parallel.py: MREM-P, one module partition per rank, and the coordinator on rank 0;
- prequant.py: PreQuant (quantize, then fine-tune the outlier columns and the head).

Each starts from a `RunContext` and ends through `RunContext.finish`."""
