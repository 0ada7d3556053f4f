import pytest
import torch
from torch import nn

from config import UserError
from models import MODELS, AlexNet, BasicModule, FoldEnsemble, ResNet34, SqueezeNet
from training.checkpoint import load_weights


@pytest.mark.parametrize('name, size', [('ResNet34', 32), ('SqueezeNet', 32), ('AlexNet', 64)])
def test_each_model_gives_two_class_scores_at_a_small_size(name, size):
    model = MODELS[name]().eval()
    with torch.inference_mode():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 2)
    assert model.model_name == name
    assert model.num_parameters() == sum(p.numel() for p in model.parameters()) > 0


def test_save_then_load_gives_back_the_same_tensors(tmp_path):
    torch.manual_seed(0)
    model = SqueezeNet()
    path = model.save(tmp_path / 'squeeze.pth')
    torch.manual_seed(1)
    other = SqueezeNet()
    assert not torch.equal(other.net.classifier[1].weight, model.net.classifier[1].weight)
    other.load(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name


def test_save_without_a_path_names_the_file_by_model_and_time(tmp_path, monkeypatch):
    import models.basic_module as basic_module

    monkeypatch.setattr(basic_module, 'CHECKPOINT_DIR', tmp_path / 'checkpoints')
    path = SqueezeNet().save()
    assert path.parent == tmp_path / 'checkpoints' and path.exists()
    assert path.name.startswith('SqueezeNet_') and path.suffix == '.pth'
    assert ':' not in path.name  # Windows refuses ':' in file names
    assert not list(path.parent.glob('*.tmp'))  # the temporary file was renamed, not left behind


def test_loading_weights_of_another_model_is_a_clear_error(tmp_path):
    path = SqueezeNet().save(tmp_path / 'squeeze.pth')
    with pytest.raises(UserError, match='do not fit ResNet34'):
        ResNet34().load(path)


def test_loading_a_training_checkpoint_of_another_model_names_it(tmp_path):
    torch.save({'model': SqueezeNet().state_dict(), 'config': {'model': 'SqueezeNet'}}, tmp_path / 'ck.pth')
    with pytest.raises(UserError, match='checkpoint of SqueezeNet, not of AlexNet; pass --model=SqueezeNet'):
        load_weights(AlexNet(), tmp_path / 'ck.pth')


def test_a_new_head_for_other_classes_starts_afresh_its_statistics_too(tmp_path):
    class Net(BasicModule):
        def __init__(self):
            super().__init__()
            self.features, self.classifier = nn.Linear(4, 4), nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))

        def head(self):
            return self.classifier

    trained = Net()
    trained.classifier[0].running_mean.fill_(5.0)
    torch.save({'model': trained.state_dict(), 'config': {'model': 'Net'}, 'classes': ['a', 'b']}, tmp_path / 'run.pth')
    model = load_weights(Net(), tmp_path / 'run.pth', ['c', 'd'])
    assert torch.equal(model.features.weight, trained.features.weight)  # the features, trained
    assert torch.equal(model.classifier[0].running_mean, torch.zeros(4))  # the head's statistics, fresh


def test_a_fold_ensemble_is_the_mean_of_its_members_probabilities_in_logs():
    class Says(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.tensor([logits])

        def forward(self, x):
            return self.logits.expand(len(x), 2)

    ensemble = FoldEnsemble([Says([0.0, 200.0]), Says([0.0, 200.0]), Says([0.0, 0.0])])
    log_probs = ensemble(torch.zeros(1, 3, 8, 8))[0]
    mean = torch.tensor([1.0, 5.0]) / 6  # (0 + 0 + 1/2) / 3 and (1 + 1 + 1/2) / 3
    torch.testing.assert_close(log_probs, mean.log())
    lone = FoldEnsemble([Says([0.0, 200.0])])(torch.zeros(1, 3, 8, 8))[0]
    assert lone[0].item() == pytest.approx(-200)  # not -inf, nor clipped where fp32 runs out


class RunsCode:
    def __reduce__(self):
        import os

        return os.system, ('touch hacked',)


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'evil.pth'
    torch.save({'model': RunsCode()}, path)
    with pytest.raises(UserError, match='is refused'):
        SqueezeNet().load(path)
    assert not (tmp_path / 'hacked').exists()


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / 'notes.pth').write_text('just text')
    with pytest.raises(UserError, match='is not a PyTorch checkpoint'):
        SqueezeNet().load(tmp_path / 'notes.pth')
    with pytest.raises(UserError, match='does not exist'):
        SqueezeNet().load(tmp_path / 'missing.pth')
