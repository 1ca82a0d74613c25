// Markdown to safe DOM. Model output and user text are untrusted: raw HTML in them is
// shown as text (never parsed as markup), and the HTML marked produces still goes
// through DOMPurify, which drops script, event handlers and javascript: URLs.
// The whole accumulated text is rendered each time, so a tag split across several
// tokens is never half-interpreted. Code blocks are highlighted after sanitizing,
// from their text, and highlight.js's markup is sanitized again before it is shown.

import DOMPurify from "../vendor/dompurify-3.4.18/purify.es.mjs";
import hljs from "../vendor/highlight.js-11.12.0/highlight.min.js";
import { Marked } from "../vendor/marked-18.2.1/marked.esm.js";

const escapeHtml = (text) =>
  text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

const marked = new Marked({
  gfm: true,
  breaks: true,
  renderer: {
    // Raw HTML blocks and inline tags: shown as the text they are.
    html: ({ text }) => escapeHtml(text),
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

/** Render `text` (Markdown) into `element`, replacing its content. */
export function renderMarkdown(element, text) {
  const html = marked.parse(text, { async: false });
  const fragment = DOMPurify.sanitize(html, {
    RETURN_DOM_FRAGMENT: true,
    FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"],
  });
  for (const code of fragment.querySelectorAll("pre > code")) highlight(code);
  for (const pre of fragment.querySelectorAll("pre")) addCopyButton(pre);
  element.replaceChildren(fragment);
}

// Only blocks that name a language highlight.js knows: guessing the language would
// run every grammar over the block at each streamed frame, and often guess wrong.
function highlight(code) {
  const language = [...code.classList].find((name) => name.startsWith("language-"))?.slice("language-".length);
  if (!language || !hljs.getLanguage(language)) return;
  const { value } = hljs.highlight(code.textContent, { language, ignoreIllegals: true });
  code.replaceChildren(DOMPurify.sanitize(value, { RETURN_DOM_FRAGMENT: true, ALLOWED_TAGS: ["span"], ALLOWED_ATTR: ["class"] }));
  code.classList.add("hljs");
}

function addCopyButton(pre) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.setAttribute("aria-label", "Copy code");
  button.addEventListener("click", async () => {
    const code = pre.querySelector("code")?.textContent ?? pre.textContent;
    try {
      await navigator.clipboard.writeText(code);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
    setTimeout(() => (button.textContent = "Copy"), 1500);
  });
  pre.prepend(button);
}
