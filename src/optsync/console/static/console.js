// optsync console: the little the pages need beyond HTML.
// - a segment's live estimate: polls a small JSON route and draws eligible counts as inline SVG;
// - the pipeline page: refreshes the numbers marked data-live;
// - "Add attribute" / "Add metric" rows, and confirmations for destructive forms.
(function () {
  "use strict";

  var SVG = "http://www.w3.org/2000/svg";
  var MAX_POINTS = 600;

  function format(n) {
    return Number(n).toLocaleString("en-US");
  }

  function svgElement(name, attributes) {
    var element = document.createElementNS(SVG, name);
    Object.keys(attributes).forEach(function (key) {
      element.setAttribute(key, attributes[key]);
    });
    return element;
  }

  // A step chart of eligible counts: the count holds until the next reading changes it.
  function drawChart(svg, points) {
    // Drawn in the element's own pixels, so the labels keep their size on a phone.
    var width = Math.max(svg.clientWidth, 200), height = svg.clientHeight || 180;
    var left = 34, right = 8, top = 10, bottom = 22;
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var now = Date.now();
    var start = points[0].t;
    var span = Math.max(now - start, 2000);
    var highest = 1;
    points.forEach(function (p) { highest = Math.max(highest, p.v, p.total); });
    var x = function (t) { return left + ((t - start) / span) * (width - left - right); };
    var y = function (v) { return top + (1 - v / highest) * (height - top - bottom); };

    [0, highest / 2, highest].forEach(function (v) {
      svg.appendChild(svgElement("line", { class: "gridline", x1: left, x2: width - right, y1: y(v), y2: y(v) }));
      var label = svgElement("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end", class: "axis" });
      label.textContent = Number.isInteger(v) ? format(v) : "";
      svg.appendChild(label);
    });

    function steps(key) {
      var path = "M" + x(points[0].t) + " " + y(points[0][key]);
      for (var i = 1; i < points.length; i++) {
        path += " H" + x(points[i].t) + " V" + y(points[i][key]);
      }
      return path + " H" + x(now);
    }
    var d = steps("v");
    var area = d + " V" + y(0) + " H" + x(points[0].t) + " Z";
    svg.appendChild(svgElement("path", { class: "area", d: area }));
    svg.appendChild(svgElement("path", { class: "total-line", d: steps("total") }));
    svg.appendChild(svgElement("path", { class: "line", d: d }));
    var last = points[points.length - 1];
    svg.appendChild(svgElement("circle", { class: "dot", cx: x(now), cy: y(last.v), r: 4 }));

    var since = svgElement("text", { x: left, y: height - 4, class: "axis" });
    since.textContent = new Date(start).toLocaleTimeString();
    svg.appendChild(since);
    var nowLabel = svgElement("text", { x: width - right, y: height - 4, "text-anchor": "end", class: "axis" });
    nowLabel.textContent = "now";
    svg.appendChild(nowLabel);
  }

  function liveEstimate(box) {
    var url = box.dataset.url;
    var interval = Number(box.dataset.interval) || 1000;
    var eligible = document.getElementById("eligible");
    var total = document.getElementById("total");
    var updated = document.getElementById("updated");
    var chart = document.getElementById("chart");
    var points = [{ t: Date.now(), v: Number(box.dataset.eligible), total: Number(box.dataset.total) }];
    drawChart(chart, points);

    function tick() {
      fetch(url, { headers: { Accept: "application/json" }, cache: "no-store", credentials: "same-origin" })
        .then(function (response) {
          if (response.status === 401) {
            box.classList.add("stale");
            updated.textContent = "Signed out: reload the page to sign in again.";
            return null;
          }
          if (!response.ok) throw new Error("HTTP " + response.status);
          return response.json();
        })
        .then(function (data) {
          if (data === null) return;  // signed out: stop asking
          eligible.textContent = format(data.eligible);
          total.textContent = format(data.total);
          points.push({ t: Date.now(), v: data.eligible, total: data.total });
          if (points.length > MAX_POINTS) points.shift();
          drawChart(chart, points);
          box.classList.remove("stale");
          updated.textContent = "Updated " + new Date().toLocaleTimeString() + ".";
          window.setTimeout(tick, interval);
        })
        .catch(function () {
          box.classList.add("stale");
          window.setTimeout(tick, interval * 3);
        });
    }
    window.setTimeout(tick, interval);
  }

  function liveStatus(section) {
    var url = section.dataset.statusUrl;
    function tick() {
      fetch(url, { headers: { Accept: "application/json" }, cache: "no-store", credentials: "same-origin" })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (values) {
          if (values === null) return;
          document.querySelectorAll("[data-live]").forEach(function (element) {
            var value = values[element.dataset.live];
            if (value !== undefined) element.textContent = value;
          });
          window.setTimeout(tick, 2000);
        })
        .catch(function () { window.setTimeout(tick, 6000); });
    }
    window.setTimeout(tick, 2000);
  }

  function addRows(button) {
    var kind = button.dataset.addRow;
    var rows = document.getElementById(kind + "-rows");
    var template = document.getElementById(kind + "-template");
    button.addEventListener("click", function () {
      if (rows.children.length >= 50) return;
      var html = template.innerHTML.split("__i__").join(String(rows.children.length));
      rows.insertAdjacentHTML("beforeend", html);
      var first = rows.lastElementChild.querySelector("input");
      if (first) first.focus();
    });
  }

  document.addEventListener("submit", function (event) {
    var question = event.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) event.preventDefault();
  });

  document.addEventListener("DOMContentLoaded", function () {
    var estimate = document.getElementById("estimate");
    if (estimate) liveEstimate(estimate);
    var status = document.querySelector("[data-status-url]");
    if (status) liveStatus(status);
    document.querySelectorAll("[data-add-row]").forEach(addRows);
  });
})();
