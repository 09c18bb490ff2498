"""Engine side of sae-serve: the vLLM wrapper, the request spec and the feature channel."""

from sae_runtime.engine.spec import (  # noqa: F401
    FeatureRequest,
    SAERequestSpec,
    SpecError,
    SteeringEdit,
    SteeringSpec,
    SteeringVector,
)
