// Markdown to safe DOM. Model output and user text are untrusted: raw HTML in them is
// shown as text (never parsed as markup), and the HTML marked produces still goes
// through DOMPurify, which drops script, event handlers and javascript: URLs.
// The whole accumulated text is rendered each time, so a tag split across several
// tokens is never half-interpreted.

import DOMPurify from "../vendor/dompurify-3.4.18/purify.es.mjs";
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
  for (const pre of fragment.querySelectorAll("pre")) addCopyButton(pre);
  element.replaceChildren(fragment);
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
