// Inline the @import rules of CSS that packages import for side effects (@jupyter-widgets/controls),
// which Remix's esbuild step cannot follow on its own.
module.exports = { plugins: { 'postcss-import': {} } };
