import { RemixBrowser } from '@remix-run/react';
import { startTransition, StrictMode } from 'react';
import { hydrateRoot } from 'react-dom/client';

// A static host serves the page rendered for `/slug` at `/slug/` (the folder `slug/index.html`). Remix reloads the
// page whenever the rendered URL and the browser's differ, so it would reload forever: take the browser's when the two
// differ only by the trailing slash (https://github.com/remix-run/remix/issues/7529).
const renderedPathname: string = window.__remixContext.url;
const browserPathname = window.location.pathname;
if (renderedPathname !== browserPathname && renderedPathname.replace(/\/+$/, '') === browserPathname.replace(/\/+$/, '')) {
  window.__remixContext.url = browserPathname;
}

function hydrate() {
  startTransition(() => {
    hydrateRoot(
      document,
      <StrictMode>
        <RemixBrowser />
      </StrictMode>,
    );
  });
}

if (window.requestIdleCallback) {
  window.requestIdleCallback(hydrate);
} else {
  // Safari doesn't support requestIdleCallback
  // https://caniuse.com/requestidlecallback
  window.setTimeout(hydrate, 1);
}
