"""What a command knows of the torchrun launch it runs in."""
import os


def first_process() -> bool:
    """Whether this is the first process of a torchrun launch, or the
    only one: it alone writes the run directory's own files."""
    return os.environ.get("RANK", "0") == "0"


def relaunch() -> str:
    """The command that continues this launch's run: under torchrun, one
    that starts as many processes again."""
    from coom.parallel.mesh import launched_world_size
    processes = launched_world_size()
    if processes == 1:
        return "coom train"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    nodes = processes // per_node
    spread = (f" --nnodes {nodes} (with this launch's rendezvous options)"
              if nodes > 1 else "")
    return f"torchrun{spread} --nproc-per-node {per_node} -m coom train"
