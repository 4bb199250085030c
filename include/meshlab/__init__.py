"""meshlab: a simulated Kubernetes + Istio cluster for rehearsing and testing mesh migrations."""
