"""What the benchmark scripts share. A script runs from benchmarks/ (its own folder is first on `sys.path`), so it
imports these as `from kit.report import write_report` and so on:

- `registry`: every benchmark's presets, and the model pairs they name;
- `report`: the JSON a benchmark writes (with its provenance), the machine's name, figures;
- `provenance`: the commit, date, machine and library versions a report was made with;
- `training`: quiet training arguments, the clock that times `train()`, NPD on a toy pair;
- `child`: one measurement in a fresh child process, and how its result comes back;
- `cli`: the command line a preset benchmark starts from.

Nothing is imported here, so that a child process that needs one module (a memory-capped loss run, an engine in
another virtual environment) loads only that one.
"""
