"""Operations: the versioned model store, the quality gate, retrain and redeploy.

`deploy.store` and `deploy.redeploy` use the standard library only, so they run in any
Python (the service image, an ops container, a bastion host) without the project's
dependencies; `deploy.retrain` needs the training stack.
"""
