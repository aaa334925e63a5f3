"""peft-core vs Hugging Face PEFT benchmark harness (project issue 7).

Run ``python -m benchmarks`` from the repository root (``--quick`` for CI, ``--only B1,B3``,
``--rounds N``, ``--out benchmarks/RESULTS.md``). Every benchmark builds the same model from a config
for both libraries, gives both the same adapter weights, checks that their outputs agree, and only
then times the two alternately in one process. See ``benchmarks/README.md``.
"""
