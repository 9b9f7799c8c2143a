"""Batch norm over the global batch of all ranks (--sync-bn).

On GPUs this is torch's nn.SyncBatchNorm. torch's version refuses CPU tensors, so on gloo (CPU ranks) the batch
norms become CpuSyncBatchNorm: the same statistics, summed over ranks with all_reduce. Both keep BatchNorm2d's
parameter and buffer names, so checkpoints are the same either way.
"""
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce  # differentiable: gradients are summed over ranks too


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics (mean, biased variance) cover every rank's batch."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = (0, 2, 3)
        local = torch.cat([x.sum(dims), x.new_tensor([x.numel() // x.size(1)])])
        total = all_reduce(local)
        count = total[-1]
        mean = total[:-1] / count
        centred = x - mean[None, :, None, None]
        var = all_reduce(centred.square().sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * count / (count - 1).clamp(min=1), momentum)
        return y


def _to_cpu_sync(module):
    if type(module) is nn.BatchNorm2d:
        synced = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats)
        synced.load_state_dict(module.state_dict())
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, _to_cpu_sync(child))
    return module


def convert_sync_batchnorm(model, device):
    """The model with every BatchNorm2d synchronised across ranks; call before making the optimizer."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_cpu_sync(model)
