// The REST API, as JSON. A failed request throws an ApiError carrying the server's
// stable error `code` (docs/protocol.md).

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// The API key, when the gateway asks for one (GATEWAY_API_KEYS). Kept for this tab
// only; never put in a URL — URLs get short-lived tokens from POST /api/tokens.
const KEY_STORAGE = "chat-gateway.api-key";
export const credentials = {
  get key() {
    return sessionStorage.getItem(KEY_STORAGE);
  },
  set key(value) {
    if (value) sessionStorage.setItem(KEY_STORAGE, value);
    else sessionStorage.removeItem(KEY_STORAGE);
  },
};

async function request(method, path, body) {
  const headers = body === undefined ? {} : { "content-type": "application/json" };
  if (credentials.key) headers.authorization = `Bearer ${credentials.key}`;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    throw new ApiError(0, "network_error", `cannot reach the server: ${error.message}`);
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = data?.error ?? {};
    throw new ApiError(response.status, error.code ?? "http_error", error.message ?? `HTTP ${response.status}`);
  }
  return data;
}

/** A token for a WebSocket or EventSource URL (query parameter `token`). */
export async function urlToken() {
  return (await request("POST", "/api/tokens")).token;
}

export const api = {
  get: (path) => request("GET", path),
  post: (path, body) => request("POST", path, body),
  patch: (path, body) => request("PATCH", path, body),
  delete: (path) => request("DELETE", path),
};
