"""Pickle-free optimizer state: a resumed trainer continues exactly as the uninterrupted one."""
import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from mxvision.train.optim_state import load_trainer_states, save_trainer_states


def _net_and_trainer(ctxs):
    mx.random.seed(0)
    net = gluon.nn.Dense(3, in_units=4)
    net.initialize(mx.init.Xavier(), ctx=ctxs)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1, "momentum": 0.9},
                            kvstore="device", update_on_kvstore=False)
    return net, trainer


def _step(net, trainer, ctxs, seed):
    rng = np.random.RandomState(seed)
    losses = []
    with autograd.record():
        for ctx in ctxs:
            x = mx.nd.array(rng.rand(2, 4), ctx=ctx)
            losses.append((net(x) ** 2).sum())
    for loss in losses:
        loss.backward()
    trainer.step(2 * len(ctxs))


def test_resume_on_two_devices_continues_like_the_uninterrupted_run(tmp_path):
    ctxs = [mx.cpu(0), mx.cpu(1)]  # two device contexts: one updater, and one state copy, each
    net, trainer = _net_and_trainer(ctxs)
    for s in range(3):
        _step(net, trainer, ctxs, s)
    net.save_parameters(str(tmp_path / "w.params"))
    save_trainer_states(trainer, tmp_path / "w.states")
    for s in range(3, 6):
        _step(net, trainer, ctxs, s)

    again, trainer2 = _net_and_trainer(ctxs)
    again.load_parameters(str(tmp_path / "w.params"), ctx=ctxs)
    load_trainer_states(trainer2, tmp_path / "w.states")
    first, second = (u.states for u in trainer2._updaters)
    assert all(first[k] is not second[k] for k in first)  # shared arrays got the momentum twice
    for s in range(3, 6):
        _step(again, trainer2, ctxs, s)
    for (name, p), q in zip(net.collect_params().items(), again.collect_params().values()):
        for ctx in ctxs:
            np.testing.assert_allclose(p.data(ctx).asnumpy(), q.data(ctx).asnumpy(), rtol=1e-6,
                                       atol=1e-7, err_msg=name)
