"""Example workloads for ``crdtsync check --workload module:function`` (see README.md)."""
