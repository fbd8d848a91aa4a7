from mmpretrain.models.contrastive import ContrastiveModel, build_model  # noqa: F401
