"""Deployment files: the container's health check, Kubernetes and KServe manifests, their validator, releases."""
