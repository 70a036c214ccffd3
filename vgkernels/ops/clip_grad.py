"""Fused global gradient-norm clipping (placeholder until the kernels land)."""


def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    raise NotImplementedError


def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
    raise NotImplementedError


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    raise NotImplementedError
