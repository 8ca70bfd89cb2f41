"""The benchmark's Hydra launchers (scripts/bench): Hydra 1.3 instantiates a launcher only from a
class defined under the `hydra_plugins` namespace package, which it scans, so they live here, a
portion of that namespace on the path beside `bench` (scripts/). Their modules import only Hydra
at the top: every Hydra command with scripts/ on its path scans them."""
