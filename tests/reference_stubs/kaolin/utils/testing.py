"""`check_tensor` validates shapes in kaolin; the reference only calls it on its own tensors."""


def check_tensor(*args, **kwargs) -> bool:
    return True
