"""Re-ranking of retrieval results over L2-normalised embeddings (cosine similarity = dot product).

k-reciprocal re-ranking (Zhong et al., CVPR 2017) comes in three forms: `KReciprocal` re-ranks a
whole query set against a gallery offline in memory bounded by the neighbour lists;
`OnlineKReciprocal` (reid.rerank.online) answers one query at a time against a large gallery that
changes: a state addressed by int64 image keys, updated in place by `add` and `remove` (local
updates, plus one exact O(n·dim) pass per added vector), snapshotted by `save` / `load`, and always
answering exactly as a state built at once from the same items would (gallery rows are not updated
for the query: the one approximation against the offline joint set). `dense_k_reciprocal` is the
plain O((Q+G)^2) reference both are tested against. Query expansion (`alpha_query_expansion`,
`average_query_expansion`) and database augmentation (`database_augmentation`) instead move the
embeddings toward their neighbours before an ordinary search. All use d = 1 - cos, never
torchreid's set-dependent column normalisation.
"""
from reid.rerank.dense import dense_k_reciprocal
from reid.rerank.expansion import alpha_query_expansion, average_query_expansion, database_augmentation
from reid.rerank.kreciprocal import KReciprocal
from reid.rerank.online import OnlineKReciprocal

__all__ = [
    "KReciprocal",
    "OnlineKReciprocal",
    "alpha_query_expansion",
    "average_query_expansion",
    "database_augmentation",
    "dense_k_reciprocal",
]
