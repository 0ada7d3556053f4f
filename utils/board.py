"""TensorBoard event files in the run's folder: `tensorboard --logdir checkpoints` shows every run.

Points are written against the global step (batches trained so far), an epoch's figures at its
last step, so a resumed run (which purges what an interrupted epoch left) has no point twice.
"""

import sys
import warnings


class Board:
    """What train() shows in TensorBoard; with enabled=False, nothing, and nothing is imported."""

    def __init__(self, run_dir, purge_step=None, enabled=True):
        self.enabled, self.writer = enabled, None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # here: --tensorboard=False never pays

            self.writer = SummaryWriter(str(run_dir), purge_step=purge_step)

    def scalar(self, tag, value, step):
        if self.writer:
            self.writer.add_scalar(tag, value, step)

    def epoch(self, record, step):
        """The figures of one epoch (a line of metrics.jsonl) and its pictures."""
        if not self.writer:
            return
        for tag, key in (
            ('loss/train', 'train_loss'),
            ('loss/val', 'val_loss'),
            ('val/accuracy', 'val_accuracy'),
            ('val/log_loss', 'val_log_loss'),
            ('lr', 'lr'),
        ):
            self.writer.add_scalar(tag, record[key], step)
        from utils.pictures import confusion_picture

        self.writer.add_image('confusion', confusion_picture(record['confusion'], record['classes']), step)

    def images(self, tag, items, step):
        """(PIL image, caption) pairs as one grid of captioned tiles."""
        if self.writer and items:
            import torch
            from torchvision.utils import make_grid

            from utils.pictures import captioned_tiles

            self.writer.add_image(tag, make_grid(torch.from_numpy(captioned_tiles(items)), nrow=4), step)

    def graph(self, model, example):
        """The model's graph, traced once on an example batch; one that cannot be traced is left out."""
        if not self.writer:
            return
        try:
            # torch.jit.trace, which add_graph uses, says it is deprecated, and warns of each branch it
            # cannot follow (TracerWarning, in ViTs): about the picture, not the training
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                self.writer.add_graph(model, example)
        except Exception as e:  # tracing fails on some control flow: the graph is a nicety
            print(f'warning: TensorBoard gets no graph of this model ({type(e).__name__})', file=sys.stderr)

    def hparams(self, options, metrics):
        """The run's options and final figures, for TensorBoard's HParams tab (in this run's own
        event file, so that each run folder is one row)."""
        if not self.writer:
            return
        from torch.utils.tensorboard.summary import hparams

        plain = {k: v for k, v in options.items() if isinstance(v, (bool, int, float, str))}
        for summary in hparams(plain, metrics):
            self.writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value)

    def close(self):
        if self.writer:
            self.writer.close()
