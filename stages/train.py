"""DVC stage: fine-tune the spam classifier on models/base; write models/classifier/ and its metrics.
train.nproc_per_node > 1: it runs itself under torch.distributed.run (DDP); only rank 0 writes."""

from gpt2lab.distributed import launch, needs_launch, process_group
from gpt2lab.params import load_params
from gpt2lab.resume import checkpoints_root, remove_checkpoint
from gpt2lab.stage import run_stage
from gpt2lab.train import train_classifier, write_outputs

BASE = "models/base"
DATA = "data/prepared"
OUT = "models/classifier"
METRICS = "metrics/train.json"
DETAILS = "metrics/train_details.json"
CURVE = "metrics/train_curve.tsv"
STEPS = "metrics/train_steps.tsv"
PLOTS = "metrics/train_plots"


def main() -> None:
    params = load_params()
    t = params.train
    if needs_launch(t.nproc_per_node):
        return launch(__file__, t.nproc_per_node, device=t.device)
    with process_group(t.device) as world:
        result = train_classifier(BASE, DATA, OUT, params.lora, t, params.seed, checkpoint_dir=checkpoints_root(),
                                  progress=True, world=world)  # fmt: skip
    if result is None:  # not rank 0: it writes nothing
        return
    write_outputs(result, METRICS, DETAILS, CURVE, PLOTS, STEPS)
    remove_checkpoint(result["checkpoint_dir"])  # only now that all is saved: a kill before this resumes
    m = result["metrics"]
    print(f"train: {m['mode']} {m['trainable_params']:,}/{m['total_params']:,} params trained on {m['device']} "
          f"x{m['processes']}, val accuracy {m['val_accuracy']:.4f}{'' if m['base_pretrained'] else ' (random base)'}, "
          f"{m['examples_per_s']:.1f} examples/s, {m['wall_time_s']:.0f} s; wrote {OUT}/ and metrics/")  # fmt: skip


if __name__ == "__main__":
    run_stage(main)
