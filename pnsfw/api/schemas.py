"""Pydantic request and response models of the HTTP API (they are the OpenAPI schema at /docs)."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

K_MAX = 1000
ID_MAX = 2**63 - 1  # ids are int64
KField = Field(10, ge=1, le=K_MAX, description="Number of neighbours (1..1000).")
IdField = Field(..., ge=0, le=ID_MAX, description="A store id (a JSON integer; not a string, float or boolean).")
Number = StrictFloat | StrictInt  # a JSON number; booleans and strings are refused
EmbeddingField = Field(..., description="One vector of the store's space (its dim numbers, finite, not all zero); "
                                        "it is L2-normalised before use.")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreRequest(_Strict):
    embedding: list[Number] = EmbeddingField


DedupField = Field(False, description="Hide duplicates: near-duplicate hits are folded into the first of them, "
                                      "which lists them under `duplicates`; k counts the groups.")
DedupSimilarityField = Field(0.95, ge=0.5, le=1.0, description="Two hits at least this similar are duplicates.")


class SearchRequest(_Strict):
    text: StrictStr | None = Field(None, min_length=1, max_length=2000)
    id: StrictInt | None = Field(None, ge=0, le=ID_MAX, description="A store id (a JSON integer).")
    embedding: list[Number] | None = Field(None, description=EmbeddingField.description)
    k: StrictInt = KField
    dedup: StrictBool = DedupField
    dedup_similarity: StrictFloat | StrictInt = DedupSimilarityField

    @model_validator(mode="after")
    def _one_query(self) -> "SearchRequest":
        given = [name for name in ("text", "id", "embedding") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, id, embedding (got {', '.join(given) or 'none'})")
        return self


class ExplainRequest(_Strict):
    id: StrictInt = IdField
    k: StrictInt = KField


class ErrorResponse(BaseModel):
    error: str = Field(..., description="Short error kind, e.g. not_image, too_large, not_found, invalid.")
    detail: Any = Field(..., description="Human-readable message (a list of field errors for `invalid`).")


class Verdict(BaseModel):
    model: str
    p_nsfw: float
    threshold: float
    nsfw: bool
    label: str = Field(..., description="The most probable class.")
    probabilities: dict[str, float]


class DuplicateModel(BaseModel):
    id: int
    similarity: float = Field(..., description="Similarity to the hit it was folded into.")


class HitModel(BaseModel):
    id: int
    uri: str
    similarity: float
    p_nsfw: float | None = None
    label: str | None = None
    duplicates: list[DuplicateModel] | None = Field(None, description="With dedup: the hits folded into this one.")


class SearchResponse(BaseModel):
    query: dict[str, Any] = Field(..., description="What was searched: {kind: image|text|id|embedding, ...}.")
    k: int
    verdict: Verdict | None = Field(None, description="The query's own score (not for text queries).")
    hits: list[HitModel]
    dedup: dict[str, Any] | None = Field(None, description="With dedup: {similarity, collapsed: hits folded}.")


class ItemResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int
    uri: str
    verdict: Verdict | None = None


class HealthResponse(BaseModel):
    status: str
    version: str
    vectors: int
    model: str | None
    encoder_loaded: bool


class StatsResponse(BaseModel):
    store: str
    version: int = Field(..., description="The store's manifest version served (it follows new commits).")
    vectors: int
    dim: int
    space: str
    encoder: dict[str, Any]
    projection: dict[str, Any]
    index: dict[str, Any] | None
    search: dict[str, Any] = Field(default_factory=dict, description="What searches run on: backend "
                                   "(faiss | torch-exact), device, and the index kind or the dtype.")
    model: dict[str, Any] | None
    errors: int
    settings: dict[str, Any]
