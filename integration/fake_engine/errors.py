"""What a fake-engine run reports when it goes wrong. A module of its own, free of vllm imports, so that the
classes stay the same when the engine switches vLLM versions (api.activate drops the modules that import vllm)."""


class ContractViolation(AssertionError):
    """The connector broke a rule of the vLLM connector API that vLLM itself asserts or relies on."""


class Livelock(AssertionError):
    """A request keeps being offered an external hit that never lets it run."""


class EngineStuck(AssertionError):
    """A run did not finish its requests within its bounds."""


class BlockLeak(AssertionError):
    """No request is left, yet some blocks are still allocated."""
