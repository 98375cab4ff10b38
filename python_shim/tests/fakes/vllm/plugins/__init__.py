"""Fake ``vllm.plugins``: loads ``vllm.general_plugins`` entry points once per process."""

plugins_loaded = False


def load_general_plugins():
    global plugins_loaded
    if plugins_loaded:
        return
    plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="vllm.general_plugins"):
        ep.load()()
