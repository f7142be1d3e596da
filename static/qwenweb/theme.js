// Before the first paint (loaded without defer, in <head>): a page whose theme is "system"
// takes the browser's setting, so it never flashes the other theme. A choice of light or dark
// came with the page (<html data-theme>, from the theme cookie).
(function (root) {
  "use strict";
  if (!root.dataset.theme) {
    root.dataset.theme = window.matchMedia && matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }
})(document.documentElement);
