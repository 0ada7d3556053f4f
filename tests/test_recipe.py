"""The recipe's options: optimizers, warm-up and schedules, label smoothing, MixUp and CutMix,
gradient accumulation and clipping, the moving average of the weights, early stopping, and
test-time flips; each one resumed exactly."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import main
from config import DefaultConfig, UserError
from conftest import as_flags, fast_options, newest_run, scripted_validation, torchrun
from data import ImageFiles
from data.images import Batch
from data.transforms import eval_transform
from models import SqueezeNet
from training import engine, recipe
from training.checkpoint import NO_PROGRESS, load_trained, load_weights
from training.recipe import WARMUP_START, Training, batch_augment
from training.report import Reporter
from utils.files import load_checkpoint
from utils.runtime import Runtime


def run_records(folder):
    return [
        json.loads(line) for line in (newest_run(folder / 'checkpoints') / 'metrics.jsonl').read_text().splitlines()
    ]


def last_state(folder):
    return load_checkpoint(newest_run(folder / 'checkpoints') / 'last.pth')


def test_warmup_starts_at_a_small_rate_and_reaches_lr_after_it(tmp_path, tiny_data):
    main.train(**fast_options(tmp_path, tiny_data, max_epoch=3, warmup_epochs=1, lr=0.002))
    lrs = [r['lr'] for r in run_records(tmp_path)]  # the rate each epoch's first step used
    assert lrs[0] == pytest.approx(0.002 * WARMUP_START)
    assert lrs[1] == pytest.approx(0.002)  # the plateau schedule takes over from --lr


def test_cosine_decays_every_epoch_and_ends_near_zero(tmp_path, tiny_data):
    main.train(**fast_options(tmp_path, tiny_data, max_epoch=3, warmup_epochs=1, lr_scheduler='cosine'))
    lrs = [r['lr'] for r in run_records(tmp_path)]
    assert lrs[0] == pytest.approx(0.001 * WARMUP_START) and lrs[1] == pytest.approx(0.001)
    assert 0 < lrs[2] < lrs[1]
    assert last_state(tmp_path)['optimizer']['param_groups'][0]['lr'] < 1e-9  # after the last step


def test_step_schedule_decays_by_lr_decay_every_lr_step_size_epochs(tmp_path, tiny_data):
    main.train(**fast_options(tmp_path, tiny_data, max_epoch=4, lr_scheduler='step', lr_step_size=2, lr_decay=0.1))
    assert [r['lr'] for r in run_records(tmp_path)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])


@pytest.mark.parametrize(
    'name, kind', [('adam', torch.optim.Adam), ('adamw', torch.optim.AdamW), ('sgd', torch.optim.SGD)]
)
def test_optimizer_choice_and_no_decay_for_biases_and_norms(name, kind):
    from training.recipe import make_optimizer

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    cfg = DefaultConfig()
    cfg.optimizer, cfg.no_decay_norm = name, True
    optimizer = make_optimizer(model, cfg, torch.device('cpu'))
    assert type(optimizer) is kind
    decayed, not_decayed = optimizer.param_groups
    assert [p.ndim for p in decayed['params']] == [4, 2] and decayed['weight_decay'] == cfg.weight_decay
    assert [p.ndim for p in not_decayed['params']] == [1, 1, 1, 1] and not_decayed['weight_decay'] == 0
    if name == 'sgd':
        assert decayed['momentum'] == 0.9 and decayed['nesterov']


def small_model():
    """No BatchNorm: the gradients of a batch do not depend on how it is split."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def one_epoch(batches, tmp_path, scaler=None, **options):
    """The weights of small_model() after train_one_epoch over `batches` with plain SGD at lr 1:
    each optimizer step subtracts the gradient."""
    model = small_model()
    cfg = DefaultConfig().parse(fast_options(tmp_path, tmp_path, channels_last=False, print_freq=1, **options))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = [Batch(images, targets, list(range(len(targets))), []) for images, targets in batches]
    training = Training(
        model,
        model,
        nn.CrossEntropyLoss(),
        optimizer,
        None,
        None,
        scaler or torch.amp.GradScaler('cpu', enabled=False),
        None,
        None,
    )
    cpu = Runtime(torch.device('cpu'))
    engine.train_one_epoch(training, loader, cpu, cfg, 0, Reporter(cfg, cpu, tmp_path, len(loader), 0))
    return model.state_dict()


def test_a_step_whose_images_all_failed_to_load_counts_in_the_schedule(tmp_path):
    # a resume puts the schedule at epochs x steps an epoch: the run that never stopped counts as many
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    training = Training(model, model, nn.CrossEntropyLoss(), optimizer, schedule, None, scaler, None, None)
    good = Batch(torch.zeros(2, 3, 12, 12, dtype=torch.uint8), torch.tensor([0, 1]), [0, 1], [])
    failed = Batch(None, None, None, [2, 3])
    cfg = DefaultConfig().parse(fast_options(tmp_path, tmp_path, channels_last=False))
    cpu = Runtime(torch.device('cpu'))
    engine.train_one_epoch(training, [good, failed, good], cpu, cfg, 0, Reporter(cfg, cpu, tmp_path, 3, 0))
    assert schedule.last_epoch == 3


def test_accumulating_two_batches_of_8_gives_the_step_of_one_batch_of_16(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8, generator=generator)
    targets = torch.randint(0, 2, (16,), generator=generator)
    whole = one_epoch([(images, targets)], tmp_path)
    halves = one_epoch([(images[:8], targets[:8]), (images[8:], targets[8:])], tmp_path, grad_accum_steps=2)
    apart = one_epoch([(images[:8], targets[:8]), (images[8:], targets[8:])], tmp_path)
    for name in whole:
        torch.testing.assert_close(halves[name], whole[name], rtol=1e-5, atol=1e-6)
    assert not all(torch.allclose(apart[name], whole[name]) for name in whole)  # two steps differ


@pytest.mark.parametrize('scaled', [False, True], ids=['plain', 'fp16 loss scaling'])
def test_clipping_bounds_the_step(tmp_path, scaled):
    generator = torch.Generator().manual_seed(0)
    batch = (
        torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8, generator=generator),
        torch.randint(0, 2, (8,), generator=generator),
    )
    before = small_model().state_dict()
    # with loss scaling the gradients are 1024 times too large until unscaled: clipping must come after
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0) if scaled else None
    after = one_epoch([batch], tmp_path, scaler, clip_grad_norm=0.01)
    step = torch.cat([(after[name] - before[name]).flatten() for name in before])
    assert step.norm() == pytest.approx(0.01, rel=1e-4)  # lr 1: the step is the clipped gradient


def test_mixup_and_cutmix_give_soft_targets_and_train(tmp_path, tiny_data):
    cfg = DefaultConfig()
    cfg.mixup_alpha, cfg.cutmix_alpha = 1.0, 1.0
    mix = batch_augment(cfg, 3)
    torch.manual_seed(0)
    soft = [mix(torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))[1] for _ in range(6)]
    for targets in soft:
        assert targets.shape == (8, 3) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
    assert any(((t > 0) & (t < 1)).any() for t in soft)  # mixed, not one-hot

    main.train(**fast_options(tmp_path / 'mixed', tiny_data, max_epoch=2, mixup_alpha=0.2, cutmix_alpha=1.0))
    main.train(**fast_options(tmp_path / 'plain', tiny_data, max_epoch=2))
    mixed, plain = run_records(tmp_path / 'mixed'), run_records(tmp_path / 'plain')
    assert len(mixed) == 2 and all(np.isfinite(r['train_loss']) for r in mixed)
    assert [r['train_loss'] for r in mixed] != [r['train_loss'] for r in plain]  # it trained on mixed batches


def test_moving_average_is_validated_kept_and_used_when_it_validates_better(tmp_path, tiny_data, capsys):
    main.train(**fast_options(tmp_path, tiny_data, max_epoch=2, ema_decay=0.5))
    state = last_state(tmp_path)
    assert state['ema'].keys() == state['model'].keys()
    assert not all(torch.equal(state['ema'][k], state['model'][k]) for k in state['model'])
    record = run_records(tmp_path)[-1]
    assert record['weights'] == state['weights'] and record['val_accuracy'] >= record['other_accuracy']

    # whichever the checkpoint names is what val, test and predict load
    for chosen in ('ema', 'model'):
        path = tmp_path / f'{chosen}.pth'
        torch.save({**state, 'weights': chosen}, path)
        cfg = DefaultConfig().parse(fast_options(tmp_path, tiny_data, load_model_path=str(path)))
        model = load_trained(cfg).model
        started = load_weights(SqueezeNet(), path)  # and what train --load_model_path starts from
        for name, tensor in [*model.state_dict().items(), *started.state_dict().items()]:
            assert torch.equal(tensor, state[chosen][name]), name
    assert 'using the moving average of the weights' in capsys.readouterr().out


def test_early_stop_ends_a_run_whose_validation_loss_does_not_improve(tmp_path, tiny_data, capsys, monkeypatch):
    scripted_validation(monkeypatch, [0.5] * 5, [0.5, 0.6, 0.7, 0.8, 0.9])
    options = fast_options(tmp_path, tiny_data, max_epoch=6, early_stop=2)
    main.train(**options)
    assert len(run_records(tmp_path)) == 3  # the first epoch sets the loss, two more do not beat it
    assert 'stopped early: the validation loss has not improved for 2 epochs' in capsys.readouterr().out
    state = last_state(tmp_path)
    assert state['stopped_early'] and state['stale_epochs'] == 2

    with pytest.raises(UserError, match=r'stopped early after epoch 3.*raise --max_epoch above 6'):
        main.train(**{**options, 'resume': 'latest'})
    main.train(**{**options, 'resume': 'latest', 'max_epoch': 8})  # a fresh patience of 2
    assert [r['epoch'] for r in run_records(tmp_path)] == [1, 2, 3, 4, 5]


def tta_probabilities(folder, model, tta):
    return tta_log_probabilities(folder, model, tta).exp()


def tta_log_probabilities(folder, model, tta):
    files = sorted(str(p) for p in folder.iterdir())
    loader = engine.make_loader(
        ImageFiles(files, [0] * len(files), eval_transform(32)),
        DefaultConfig().parse(dict(num_workers=0, batch_size=4)),
        Runtime(torch.device('cpu')),
    )
    return engine.infer(model, loader, Runtime(torch.device('cpu')), tta=tta)[0]


def test_tta_keeps_a_confident_models_log_probabilities_finite(tmp_path):
    class Confident(nn.Module):  # the first class 200 below the second: its probability underflows to 0
        def forward(self, images):
            return torch.tensor([[0.0, 200.0]]).expand(len(images), 2) + 0 * images.mean()

    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / 'black.png')
    plain, mirrored = (tta_log_probabilities(tmp_path, Confident(), tta) for tta in (False, True))
    torch.testing.assert_close(mirrored, plain)  # the same answer twice: its mean is itself, -200 and 0
    assert plain[0, 0].item() == pytest.approx(-200)


def test_tta_averages_an_image_and_its_mirror_image(tmp_path):
    rng = np.random.default_rng(0)
    half = rng.integers(0, 256, (32, 16, 3), dtype=np.uint8)
    Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(tmp_path / 'symmetric.png')
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / 'noise.png')
    model = small_model().eval()  # its answer changes when the image is mirrored

    plain, flipped = tta_probabilities(tmp_path, model, False), tta_probabilities(tmp_path, model, True)
    torch.testing.assert_close(flipped[1], plain[1])  # symmetric.png (sorted after noise.png)
    image = engine.model_input(
        eval_transform(32)(torch.from_numpy(np.asarray(Image.open(tmp_path / 'noise.png'))).permute(2, 0, 1)).unsqueeze(
            0
        ),
        torch.device('cpu'),
    )
    with torch.no_grad():
        by_hand = (model(image).softmax(1) + model(image.flip(-1)).softmax(1)) / 2
    torch.testing.assert_close(flipped[0], by_hand[0])
    assert not torch.allclose(flipped[0], plain[0])


RECIPES = {
    'sgd, cosine after a warm-up, no decay of norms': dict(
        optimizer='sgd', lr_scheduler='cosine', warmup_epochs=1, no_decay_norm=True, lr=0.01
    ),
    'adamw, plateau after a warm-up': dict(optimizer='adamw', warmup_epochs=1),
    'step decay': dict(lr_scheduler='step', lr_step_size=1),
    'mixup, cutmix, label smoothing': dict(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1),
    'accumulation and clipping': dict(grad_accum_steps=3, clip_grad_norm=0.5),
    'moving average and early stopping': dict(ema_decay=0.5, early_stop=5),
    'an augmentation policy and random erasing': dict(auto_augment='augmix', random_erase=0.5),
}


@pytest.mark.slow
@pytest.mark.parametrize('recipe', RECIPES.values(), ids=RECIPES.keys())
def test_each_option_resumes_exactly(tmp_path, tiny_data, recipe, monkeypatch):
    whole, parts = tmp_path / 'whole', tmp_path / 'parts'
    main.train(**fast_options(whole, tiny_data, max_epoch=3, **recipe))

    real = engine.train_one_epoch

    def stopped_at_epoch_3(training, loader, rt, cfg, epoch, reporter):  # a Ctrl-C as the third epoch starts
        if epoch == 2:
            raise KeyboardInterrupt
        return real(training, loader, rt, cfg, epoch, reporter)

    monkeypatch.setattr(engine, 'train_one_epoch', stopped_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        main.train(**fast_options(parts, tiny_data, max_epoch=3, **recipe))
    monkeypatch.undo()
    main.train(**fast_options(parts, tiny_data, max_epoch=3, resume='latest'))  # the recipe from the checkpoint
    assert run_records(parts) == [
        {**r, 'seconds': p['seconds'], 'images_per_second': p['images_per_second']}
        for r, p in zip(run_records(whole), run_records(parts))
    ]
    a, b = last_state(whole), last_state(parts)
    for key in ('model', 'ema'):
        for name, tensor in (a[key] or {}).items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert a['step_scheduler'] == b['step_scheduler'] and a['scheduler'] == b['scheduler']
    assert {k: a[k] for k in NO_PROGRESS} == {k: b[k] for k in NO_PROGRESS}


@pytest.mark.slow
def test_the_recipe_under_torchrun_resumes_exactly(tmp_path, tiny_data):
    recipe = dict(
        optimizer='sgd',
        warmup_epochs=1,
        lr=0.01,
        no_decay_norm=True,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        label_smoothing=0.1,
        grad_accum_steps=2,
        clip_grad_norm=1.0,
        ema_decay=0.5,
        early_stop=5,
        batch_size=4,
    )
    whole, parts = tmp_path / 'whole', tmp_path / 'parts'
    for folder, more in (
        (whole, dict(max_epoch=3)),
        (parts, dict(max_epoch=2)),
        (parts, dict(max_epoch=3, resume='latest')),
    ):
        result = torchrun('train', *as_flags(fast_options(folder, tiny_data, **recipe, **more)))
        assert result.returncode == 0, result.stderr
    assert 'in each of 2 processes' in result.stdout
    a, b = last_state(whole), last_state(parts)
    for key in ('model', 'ema'):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert [r['val_loss'] for r in run_records(whole)] == [r['val_loss'] for r in run_records(parts)]


# Each option below is held by a test that fails when the option stops reaching the run: the
# option given as a user gives it (main.train's keywords are the command line's options).


def spied_model(monkeypatch):
    """[(channels_last input?, autocast dtype or False, training?)] of every forward pass of the
    model that main.train builds."""
    seen, real = [], recipe.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_pre_hook(
            lambda module, inputs: seen.append(
                (
                    inputs[0].is_contiguous(memory_format=torch.channels_last),
                    torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu'),
                    module.training,
                )
            )
        )
        return model

    monkeypatch.setattr(recipe, 'build_model', build)
    return seen


@pytest.mark.parametrize('amp, channels_last', [('True', True), ('False', False)])
def test_amp_and_channels_last_reach_every_training_step(tmp_path, tiny_data, monkeypatch, amp, channels_last):
    from utils.runtime import compute_dtype

    seen = spied_model(monkeypatch)
    main.train(**fast_options(tmp_path, tiny_data, amp=amp, channels_last=channels_last))
    steps = [s for s in seen if s[2]]
    assert len(steps) == 4  # 28 training images in batches of 8
    expected = compute_dtype(torch.device('cpu'), amp) or False  # bf16 where this CPU has it, else fp32
    assert all(layout == channels_last and dtype == expected for layout, dtype, _ in steps)


def test_the_plateau_decays_by_lr_decay(tmp_path, tiny_data, monkeypatch):
    scripted_validation(monkeypatch, [0.5] * 3, [0.5, 0.6, 0.7])  # epoch 2 is worse: a decay
    main.train(**fast_options(tmp_path, tiny_data, max_epoch=3, lr_decay=0.1))
    assert [r['lr'] for r in run_records(tmp_path)] == pytest.approx([1e-3, 1e-3, 1e-4])


def test_warmup_steps_every_batch_and_holds_the_plateau_back_until_it_ends(tmp_path, tiny_data, monkeypatch):
    scripted_validation(monkeypatch, [0.5] * 4, [0.5, 0.9, 0.95, 0.99])
    main.train(**fast_options(tmp_path, tiny_data, max_epoch=4, warmup_epochs=2))
    lrs = [r['lr'] for r in run_records(tmp_path)]
    # 4 optimizer steps an epoch: epoch 2 starts half-way up the 8 steps of the warm-up
    assert lrs[1] == pytest.approx(1e-3 * (WARMUP_START + (1 - WARMUP_START) * 4 / 8))
    assert lrs[2] == pytest.approx(1e-3)  # epoch 2's worse loss came during the warm-up: no decay
    assert lrs[3] == pytest.approx(1e-3)  # the plateau's first loss (0.95) is its best so far


def test_every_epoch_draws_a_new_order(tmp_path, tiny_data, monkeypatch):
    orders, real = [], engine.train_one_epoch

    def spy(training, loader, rt, cfg, epoch, reporter):
        orders.append(list(loader.sampler))
        return real(training, loader, rt, cfg, epoch, reporter)

    monkeypatch.setattr(engine, 'train_one_epoch', spy)
    main.train(**fast_options(tmp_path, tiny_data, max_epoch=2))
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]


@pytest.mark.parametrize(
    'augment, varies',
    [
        (dict(hflip=False, crop_scale=1.0), False),
        (dict(hflip=True, crop_scale=1.0), True),
        (dict(hflip=False, crop_scale=0.5), True),
    ],
)
def test_train_augments_as_its_options_say(tmp_path, tiny_data, monkeypatch, augment, varies):
    import random

    made, real = [], engine.DogCat
    monkeypatch.setattr(engine, 'DogCat', lambda *args, **kwargs: made.append(real(*args, **kwargs)) or made[-1])
    main.train(**fast_options(tmp_path, tiny_data, **augment))
    training_set = made[0]
    draws = []
    for seed in range(6):
        torch.manual_seed(seed)
        random.seed(seed)
        draws.append(training_set[0][0])
    assert any(not torch.equal(draws[0], draw) for draw in draws[1:]) == varies


def first_inputs(monkeypatch, tmp_path, tiny_data, **options):
    """The normalised batch the network saw first in main.train(options)."""
    seen, real = [], recipe.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().float().clone()))
        return model

    monkeypatch.setattr(recipe, 'build_model', build)
    main.train(**fast_options(tmp_path, tiny_data, hflip=False, **options))
    monkeypatch.undo()
    return seen[0]


@pytest.mark.parametrize('policy', ['trivial', 'rand', 'augmix'])
def test_each_augmentation_policy_reaches_the_images_the_network_sees(tmp_path, tiny_data, monkeypatch, policy):
    plain = first_inputs(monkeypatch, tmp_path / 'plain', tiny_data)
    augmented = first_inputs(monkeypatch, tmp_path / policy, tiny_data, auto_augment=policy)
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)
    made = load_checkpoint(newest_run(tmp_path / policy / 'checkpoints') / 'last.pth')['config']
    assert made['auto_augment'] == policy


def test_random_erasing_blanks_a_rectangle_of_every_image_after_normalising(tmp_path, tiny_data, monkeypatch):
    plain = first_inputs(monkeypatch, tmp_path / 'plain', tiny_data)
    erased = first_inputs(monkeypatch, tmp_path / 'erased', tiny_data, random_erase=1.0)
    blank = (erased == 0).all(dim=1)  # 0 in every channel: the mean pixel after normalising
    assert blank.flatten(1).any(dim=1).all()  # a rectangle in each image
    assert ((erased != plain).any(dim=1) == blank).all()  # the rest is untouched
    assert not (plain == 0).all(dim=1).any()


@pytest.mark.parametrize('option', ['mixup_alpha', 'cutmix_alpha'])
def test_mixed_batches_reach_the_loss(tmp_path, tiny_data, monkeypatch, option):
    targets_seen = []

    class Recording(nn.CrossEntropyLoss):
        def forward(self, logits, targets):
            targets_seen.append(targets.detach().clone())
            return super().forward(logits, targets)

    monkeypatch.setattr(torch.nn, 'CrossEntropyLoss', Recording)
    main.train(**fast_options(tmp_path, tiny_data, **{option: 1.0}))
    assert len(targets_seen) == 4 and all(t.shape == (8, 2) or t.shape == (4, 2) for t in targets_seen)
    assert any(((t > 0) & (t < 1)).any() for t in targets_seen)  # mixed: not one-hot


def test_label_smoothing_shapes_the_training_loss_and_stays_out_of_the_validation_loss(
    tmp_path, tiny_data, monkeypatch, capsys
):
    first = {}
    real = Reporter.train_loss

    def first_point(self, value, epoch, step):  # print_freq=1: the loss of the first batch, before any step
        first.setdefault(self.metrics_file.parent.parent.parent.name, value)
        real(self, value, epoch, step)

    monkeypatch.setattr(Reporter, 'train_loss', first_point)
    main.train(**fast_options(tmp_path / 'plain', tiny_data, print_freq=1))
    main.train(**fast_options(tmp_path / 'smooth', tiny_data, print_freq=1, label_smoothing=0.3))
    assert first['plain'] != first['smooth']  # the same weights and batch: the targets differ

    capsys.readouterr()
    main.val(**fast_options(tmp_path / 'smooth', tiny_data, load_model_path='latest'))
    printed = float(capsys.readouterr().out.split('validation images: loss ')[1].split()[0])
    assert printed == pytest.approx(run_records(tmp_path / 'smooth')[-1]['val_loss'], abs=1e-4)  # plain NLL


def test_the_moving_average_follows_the_weights_and_batchnorm_statistics(tmp_path, tiny_data):
    # a decay of almost 0: the average is the newest weights, BatchNorm's running statistics included
    main.train(**fast_options(tmp_path / 'newest', tiny_data, model='resnet18', ema_decay=1e-6))
    state = last_state(tmp_path / 'newest')
    floats = [name for name, tensor in state['model'].items() if tensor.is_floating_point()]
    assert any('running_mean' in name for name in floats)
    for name in floats:
        torch.testing.assert_close(state['ema'][name], state['model'][name], rtol=1e-4, atol=1e-5)
    # a decay of 0.5: the statistics are averaged too, not copied from the model
    main.train(**fast_options(tmp_path / 'half', tiny_data, model='resnet18', ema_decay=0.5))
    state = last_state(tmp_path / 'half')
    statistics = [name for name in state['model'] if 'running_mean' in name]
    assert not any(torch.allclose(state['ema'][name], state['model'][name]) for name in statistics)


@pytest.mark.parametrize('better', ['model', 'ema'])
def test_validation_scores_the_model_and_its_average_apart(tmp_path, better):
    class Says(nn.Module):  # answers `label` for every image
        def __init__(self, label):
            super().__init__()
            self.bias = nn.Parameter(torch.tensor([1.0, 0.0]) if label == 0 else torch.tensor([0.0, 1.0]))

        def forward(self, images):
            return self.bias.expand(len(images), 2)

    Image.new('RGB', (8, 8)).save(tmp_path / 'a.png')
    files = [str(tmp_path / 'a.png')] * 4
    cpu = Runtime(torch.device('cpu'))
    cfg = DefaultConfig().parse(dict(num_workers=0, batch_size=4))
    loader = engine.make_loader(ImageFiles(files, [0, 0, 0, 1], eval_transform(8)), cfg, cpu)
    model, average = Says(0), torch.optim.swa_utils.AveragedModel(Says(0))
    average.module.load_state_dict(Says(1).state_dict())  # the average answers 1: right once in four
    if better == 'ema':
        model, average.module = average.module, model
    metrics = engine.validate(Training(model, model, None, None, None, None, None, average, None), loader, cpu)
    assert (metrics['weights'], metrics['accuracy'], metrics['other_accuracy']) == (better, 0.75, 0.25)
    assert metrics['model_loss'] == engine.score(engine.infer(model, loader, cpu))['loss']  # the model's own


def test_with_a_moving_average_the_decay_and_early_stop_follow_the_models_own_loss(tmp_path, tiny_data, monkeypatch):
    # the model and its average improve every epoch, but the better of them swaps: epoch 3's model
    # (0.29) would be a stall after epoch 2's average (0.28), and halve the rate and stop the run
    script = iter(
        [
            (0.85, 0.40, 'model', 0.40),
            (0.905, 0.28, 'ema', 0.30),
            (0.92, 0.29, 'model', 0.29),
            (0.93, 0.27, 'ema', 0.28),
        ]
    )
    real = engine.validate

    def validate(*args, **kwargs):
        accuracy, loss, weights, own = next(script)
        return {**real(*args, **kwargs), 'accuracy': accuracy, 'loss': loss, 'weights': weights, 'model_loss': own}

    monkeypatch.setattr(engine, 'validate', validate)
    main.train(**fast_options(tmp_path, tiny_data, max_epoch=4, ema_decay=0.5, early_stop=1))
    assert len(run_records(tmp_path)) == 4  # no early stop after epoch 3
    assert [r['model_val_loss'] for r in run_records(tmp_path)] == [0.40, 0.30, 0.29, 0.28]  # the loss it followed
    assert len({r['lr'] for r in run_records(tmp_path)}) == 1  # no decay


def test_fp16_loss_scaling_resumes_where_it_stood(tmp_path):
    from models import SqueezeNet
    from training.checkpoint import Resume, restore, training_state
    from training.recipe import make_training

    fp16 = Runtime(torch.device('cpu'), dtype=torch.float16)
    cfg = DefaultConfig()
    cfg.model = 'SqueezeNet'

    def training():
        model = SqueezeNet()
        return make_training(model, model, cfg, fp16, steps_per_epoch=4, num_classes=2)

    before = training()
    assert before.scaler.is_enabled()
    before.scaler.scale(torch.ones(1))
    before.scaler.update(512.0)  # as after a few overflows
    state = training_state(cfg, ['cat', 'dog'], 0, before, dict(NO_PROGRESS), None)
    after = training()
    restore(Resume(tmp_path / 'last.pth', state), after, ['cat', 'dog'], None)
    assert after.scaler.get_scale() == 512.0 and after.scaler.state_dict() == before.scaler.state_dict()


def test_a_cosine_run_resumed_for_more_epochs_stretches_its_decay(tmp_path, tiny_data):
    options = fast_options(tmp_path, tiny_data, max_epoch=2, warmup_epochs=1, lr_scheduler='cosine')
    main.train(**options)
    main.train(**{**options, 'max_epoch': 3, 'resume': 'latest'})
    # 4 steps an epoch: epoch 3 starts half-way along the 8 decay steps of a 3-epoch run
    assert run_records(tmp_path)[2]['lr'] == pytest.approx(1e-3 * 0.5)


def test_a_cosine_run_resumed_at_another_batch_size_goes_on_from_its_epoch(tmp_path, tiny_data):
    options = fast_options(tmp_path, tiny_data, max_epoch=2, warmup_epochs=1, lr_scheduler='cosine')
    main.train(**options)
    main.train(**{**options, 'max_epoch': 3, 'batch_size': 4, 'resume': 'latest'})
    # 7 steps an epoch now, not 4: epoch 3 still starts half-way along the decay, now of 14 steps
    assert run_records(tmp_path)[2]['lr'] == pytest.approx(1e-3 * 0.5)


def test_a_warm_up_resumed_at_another_batch_size_ends_at_its_epoch(tmp_path, tiny_data):
    options = fast_options(tmp_path, tiny_data, max_epoch=3, warmup_epochs=2, batch_size=4)

    class Stop(Exception):
        pass

    def stop(epoch, metrics, last):
        raise Stop  # after epoch 1 is saved, as a crash would

    with pytest.raises(Stop):
        main.train_with(options, on_epoch=stop)
    main.train(**{**options, 'batch_size': 8, 'resume': 'latest'})
    # 7 steps in epoch 1, 4 an epoch now: the plateau's warm-up of 2 epochs still ends as epoch 3 starts
    halfway = 1e-3 * (WARMUP_START + (1 - WARMUP_START) / 2)
    assert [r['lr'] for r in run_records(tmp_path)] == pytest.approx([1e-3 * WARMUP_START, halfway, 1e-3])
