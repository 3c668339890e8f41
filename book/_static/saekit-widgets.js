// Loaded between RequireJS and the widget manager (nb_ipywidgets_js in _config.yml) on every page
// that shows widgets.
(function () {
  "use strict";

  // Each bundle in embed-amd.js computes where its fonts live from its RequireJS module URL,
  // which by default sits beside the page (book/@jupyter-widgets/...). The files are served from
  // _static/widgets/, beside this script: give every bundle a URL in that folder.
  var here = (document.currentScript && document.currentScript.src) || document.baseURI;
  var widgets = new URL("widgets", here).href;
  var paths = { "@jupyter-widgets/html-manager/dist": widgets };
  ["base", "base7", "controls", "controls7", "html-manager"].forEach(function (name) {
    paths["@jupyter-widgets/" + name] = widgets + "/" + name;
  });
  window.require.config({ paths: paths });

  // The widget manager typesets with MathJax 2's MathJax.Hub.Queue(["Typeset", hub, element]);
  // the site serves MathJax 3, whose global (set when its deferred script runs, after this one)
  // has typesetPromise instead. Give every MathJax 3 global a Hub.Queue that does the same.
  function addHub(mathjax) {
    if (!mathjax || !mathjax.version || mathjax.Hub) return;
    mathjax.Hub = {
      Queue: function () {
        var elements = [];
        Array.prototype.forEach.call(arguments, function (job) {
          if (Array.isArray(job) && job[0] === "Typeset" && job[2]) elements.push(job[2]);
        });
        var ready = (mathjax.startup && mathjax.startup.promise) || Promise.resolve();
        return ready
          .then(function () {
            return mathjax.typesetPromise(elements.length ? elements : undefined);
          })
          .catch(function (error) {
            console.error("MathJax could not typeset a widget:", error);
          });
      },
    };
  }
  var current = window.MathJax;
  addHub(current);
  Object.defineProperty(window, "MathJax", {
    configurable: true,
    enumerable: true,
    get: function () {
      return current;
    },
    set: function (value) {
      current = value;
      addHub(value);
    },
  });
})();
