"""Reading a compiled pipeline spec: tasks inside the shards' ParallelFor sit in the loop's own component."""


def dag_tasks(spec: dict) -> dict:
    """Every task of the pipeline by name, those inside a ParallelFor included (the loops themselves not)."""
    tasks = {}
    for name, task in spec["root"]["dag"]["tasks"].items():
        if name.startswith("for-loop"):
            tasks.update(spec["components"][task["componentRef"]["name"]]["dag"]["tasks"])
        else:
            tasks[name] = task
    return tasks


def parameter_source(reference: dict) -> str:
    """The pipeline parameter a task input comes from (inside a loop, KFP prefixes it with pipelinechannel--)."""
    return reference["componentInputParameter"].removeprefix("pipelinechannel--")
