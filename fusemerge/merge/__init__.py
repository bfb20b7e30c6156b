"""The streaming merge engine: recipe -> plan -> stream of tensors -> sharded writer."""
