"""The server's OpenAPI 3 contract (GET /openapi.json), written out so every status and body is the real one."""

from __future__ import annotations

from typing import Any

from .serve_limits import Limits, option_bounds

ERROR = {"$ref": "#/components/schemas/Error"}
SCORES = {"type": "object", "additionalProperties": {"type": "number"}}
TASK = {
    "type": "object",
    "properties": {
        "label": {"type": "string"},
        "score": {"type": "number"},
        "scores": SCORES,
        "set": {"type": "array", "items": {"type": "string"}, "description": "conformal label set"},
        "years": {"type": "number", "description": "expected age in years (age only)"},
    },
    "required": ["label", "score", "scores"],
}
FACE = {
    "type": "object",
    "properties": {
        "box": {
            "type": "object",
            "properties": {key: {"type": "integer"} for key in ("xmin", "ymin", "xmax", "ymax")},
            "required": ["xmin", "ymin", "xmax", "ymax"],
        },
        "detection_score": {"type": "number"},
    },
    "required": ["box", "detection_score"],
    "additionalProperties": TASK,
}
ANALYSIS = {
    "type": "object",
    "properties": {
        "backend": {"type": "string"},
        "model_digest": {"type": "string"},
        "max_faces": {"type": "integer", "description": "faces kept per image (largest first)"},
        "truncated": {
            "type": "array",
            "items": {"type": "boolean"},
            "description": "per image: true when it held more faces than max_faces (the rest are not answered)",
        },
        "results": {"type": "array", "items": {"type": "array", "items": {"$ref": "#/components/schemas/Face"}}},
    },
    "required": ["backend", "model_digest", "max_faces", "truncated", "results"],
}


def error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": ERROR}}}
    if headers:
        answer["headers"] = headers
    return answer


def json_ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


UNAUTHORIZED = error("a missing or wrong bearer token (when SOFTBIO_API_TOKEN is set)")
ANALYZE_ERRORS = {
    "401": UNAUTHORIZED,
    "403": error('a {"urls": [...]} body to a server started without --allow-urls'),
    "405": error("a method the path does not take"),
    "408": error("the body did not arrive within --body-timeout"),
    "413": error("a body, an image count (--max-images), an image or a request's pixels over the caps"),
    "415": error("a Content-Type that is not an image, multipart/form-data or application/json"),
    "422": error("an image that does not decode, an option out of bounds, an unavailable detector (names the fix)"),
    "429": error("the queue is full", {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}),
    "500": error("an error of the server's own (reported with the request id)"),
    "503": error("the model cannot answer now (not ready)"),
    "504": error("the request could not be answered within --request-timeout; its work was dropped"),
}


def parameters(limits: Limits) -> list[dict[str, Any]]:
    found = []
    for name, (kind, low, high, what) in option_bounds(limits).items():
        if kind is str:
            schema: dict[str, Any] = {"type": "string", "enum": list(limits.detectors)}
        else:
            schema = {"type": "integer" if kind is int else "number", "minimum": low, "maximum": high}
        found.append({"name": name, "in": "query", "required": False, "description": what, "schema": schema})
    return found


def openapi(limits: Limits, version: str) -> dict[str, Any]:
    secured = [{"bearer": []}] if limits.token else []
    plain_ok = {"200": json_ok("alive", {"type": "object", "properties": {"status": {"type": "string"}}})}
    return {
        "openapi": "3.0.3",
        "info": {"title": "softbio", "version": version, "description": "Age group, gender and emotion of every face"},
        "paths": {
            "/v1/analyze": {
                "post": {
                    "summary": "Every face of one image (the body) or several (multipart parts)",
                    "security": secured,
                    "parameters": parameters(limits),
                    "requestBody": {
                        "required": True,
                        "content": {
                            "image/*": {"schema": {"type": "string", "format": "binary"}},
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "file": {
                                            "type": "array",
                                            "items": {"type": "string", "format": "binary"},
                                            "minItems": 1,
                                            "maxItems": limits.max_images,
                                        }
                                    },
                                    "required": ["file"],
                                    "additionalProperties": False,
                                },
                                "encoding": {"file": {"contentType": "image/*"}},
                            },
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "urls": {
                                            "type": "array",
                                            "items": {"type": "string", "pattern": "^https?://"},
                                            "minItems": 1,
                                            "maxItems": limits.max_images,
                                        }
                                    },
                                    "required": ["urls"],
                                    "additionalProperties": False,
                                    "description": "only with --allow-urls (else 403)",
                                }
                            },
                        },
                    },
                    "responses": {
                        "200": {
                            **json_ok("the faces of each image, in order", {"$ref": "#/components/schemas/Analysis"}),
                            "headers": {"X-Model-Digest": {"schema": {"type": "string"}}},
                        },
                        **ANALYZE_ERRORS,
                    },
                }
            },
            "/v1/model": {
                "get": {
                    "summary": "What the model answers: tasks, labels, versions, backend, digest",
                    "security": secured,
                    "responses": {"200": json_ok("the model", {"type": "object"}), "401": UNAUTHORIZED},
                }
            },
            "/health": {"get": {"summary": "Liveness (kept for older probes)", "responses": plain_ok}},
            "/health/live": {"get": {"summary": "The process answers", "responses": plain_ok}},
            "/health/ready": {
                "get": {
                    "summary": "The model is loaded, warmed, its export still there and it answers",
                    "responses": {**plain_ok, "503": error("not ready, and why")},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (text format)",
                    "responses": {
                        "200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
                "Face": FACE,
                "Analysis": ANALYSIS,
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
