"""A model's weights shared over the mesh: the daemon's keeper, the span fetcher, its cache, the Hub source.

The wire side is `node.mesh.weights` (`/moemesh/weights/1.0.0`); the manifest and model id are
`shards.manifest`. Import the modules themselves (`node.weights.keeper`, `.fetch`, `.cache`, `.hub`).
"""
