"""Data-parallel SGD on MXNet's parameter server (``dist_sync``), without gluon.Trainer's kvstore.

``gluon.Trainer(kvstore=dist_sync, update_on_kvstore=False)`` uses kvstore key ``i`` twice: to
broadcast parameter ``i`` from rank 0 (init + pull, at its first ``step``) and to sum gradient
``i`` (pushpull). On the server both share one stored value, and on a worker the initial pull
and the first gradient pushpull are queued on MXNet's engine with no order between them (they
write different arrays). When the pull is served after the first gradient round has completed,
that worker starts from the *summed gradient* instead of the weights. Seen here: 1 run in about 15
of a 2-worker training with the other core busy, always rank 0's output-layer weight, train loss
21.3 instead of 0.81 (tests/distributed/test_distributed.py, docs/SCALING.md).

Here parameters and gradients have separate keys, every worker waits until its initial pull has
landed before it trains, and the optimizer stays a plain ``gluon.Trainer`` on each worker
(``kvstore=None``: its ``update`` applies the summed gradients).
"""
import mxnet as mx

#: kvstore keys: parameter i is broadcast under PARAM_KEY + i, gradient i summed under GRAD_KEY + i
#: (callers' own keys start at 1 << 20: mxvision.distributed.train)
PARAM_KEY, GRAD_KEY = 0, 1 << 19


def broadcast_params(kv, params):
    """Give every worker rank 0's values of ``params`` (a ParameterDict or list, one context) and
    prepare the gradient keys; returns the parameters that train (grad_req != 'null').

    Call on every worker, after loading any checkpoint, before the first step."""
    params = list(params.values()) if hasattr(params, "values") else list(params)
    kv.init([PARAM_KEY + i for i in range(len(params))], [p.data() for p in params])
    for i, p in enumerate(params):
        kv.pull(PARAM_KEY + i, out=p.list_data())
    mx.nd.waitall()  # every pull has landed before any gradient of this worker is pushed
    trained = [p for p in params if p.grad_req != "null"]
    kv.init([GRAD_KEY + i for i in range(len(trained))], [mx.nd.zeros(p.shape, dtype=p.dtype) for p in trained])
    return trained


def allreduce_grads(kv, trained):
    """Sum every trained parameter's gradient over the workers, in place (after ``backward``,
    before ``trainer.update(global_batch)``)."""
    for i, p in enumerate(trained):
        grads = p.list_grad()
        kv.pushpull(GRAD_KEY + i, grads, out=grads, priority=-i)
