#!/usr/bin/env bash
# curl calls against an epic-sglang server:  epic-sglang serve --store ~/rag-store &  bash examples/curl.sh
# URL, API_KEY and ADMIN_KEY (for /v1/documents) come from the environment.
set -euo pipefail
URL=${URL:-http://127.0.0.1:30000}
AUTH=() ADMIN=()
[[ -n "${API_KEY:-}" ]] && AUTH=(-H "Authorization: Bearer $API_KEY") && ADMIN=("${AUTH[@]}")
[[ -n "${ADMIN_KEY:-}" ]] && ADMIN=(-H "Authorization: Bearer $ADMIN_KEY")
J=(-H "Content-Type: application/json")

curl -sf "${AUTH[@]}" "$URL/get_model_info"; echo
# add documents (admin route), precompiled for the default policy
curl -sf "${ADMIN[@]}" "${J[@]}" "$URL/v1/documents" -d '{"documents": [
  {"title": "Eiffel Tower", "text": "The Eiffel Tower is a wrought-iron lattice tower in Paris, finished in March 1889 for the World'"'"'s Fair."},
  {"title": "Mount Fuji", "text": "Mount Fuji is the highest mountain in Japan at 3,776 metres; it last erupted in 1707."}],
  "precompile": true}'; echo
# RAG: retrieve, link, answer, cite
curl -sf "${AUTH[@]}" "${J[@]}" "$URL/v1/rag" -d '{"question": "When was the Eiffel Tower finished?", "top_k": 2,
  "sampling_params": {"max_new_tokens": 32}}'; echo
# SGLang native, with a document marked by character span
curl -sf "${AUTH[@]}" "${J[@]}" "$URL/generate" -d '{"text": "Mount Fuji is the highest mountain in Japan at 3,776 metres.\n\nHow high is it?",
  "kv_hints": {"spans": [[0, 60]]}, "sampling_params": {"max_new_tokens": 16, "temperature": 0}}'; echo
# streaming (SGLang SSE: cumulative text, then data: [DONE])
curl -sfN "${AUTH[@]}" "${J[@]}" "$URL/generate" -d '{"text": "Count: 1, 2,", "stream": true, "sampling_params": {"max_new_tokens": 8}}'
# OpenAI chat with documents
curl -sf "${AUTH[@]}" "${J[@]}" "$URL/v1/chat/completions" -d '{"model": "any", "max_tokens": 24, "temperature": 0,
  "messages": [{"role": "user", "content": "How high is Mount Fuji?"}],
  "documents": ["Mount Fuji is the highest mountain in Japan at 3,776 metres."]}'; echo
curl -sf "$URL/metrics" | grep -E '^epic_(time_to_first_token_seconds_count|tokens_total)'
