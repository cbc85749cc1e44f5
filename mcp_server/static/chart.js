// The throughput chart: texts/s over the last minutes, drawn on a canvas.
// Live points come from the feed's `stats` events (every 2 s); the first stats
// event of a connection has no rate yet (null), which is skipped, not drawn as 0.
// The minutes before the page loaded come from `setHistory` (see dashboard.js).

export class RateChart {
  constructor(canvas, windowS = 600) {
    this.canvas = canvas;
    this.windowS = windowS;
    this.points = [];
    this.history = [];
  }

  setHistory(points) {
    this.history = points;
    this.draw();
  }

  add(rate, atMs = Date.now()) {
    if (rate === null || rate === undefined) return;
    this.points.push([atMs, rate]);
    const since = atMs - this.windowS * 1000;
    while (this.points.length && this.points[0][0] < since) this.points.shift();
    this.draw(atMs);
  }

  draw(nowMs = Date.now()) {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || canvas.width;
    const height = canvas.clientHeight || canvas.height;
    canvas.width = width * ratio;
    canvas.height = height * ratio;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const left = 44, bottom = 20, top = 8, right = 8;
    const plotW = width - left - right, plotH = height - top - bottom;
    const start = nowMs - this.windowS * 1000;
    const shown = [...this.history, ...this.points].filter((p) => p[0] >= start)
      .sort((a, b) => a[0] - b[0]);
    const peak = Math.max(1, ...shown.map((p) => p[1]));
    const scale = niceCeiling(peak);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#6b7280";
    ctx.strokeStyle = "#e5e7eb";
    ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = top + plotH - (plotH * i) / 4;
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + plotW, y); ctx.stroke();
      ctx.fillText(formatRate((scale * i) / 4), 4, y + 4);
    }
    for (let m = 0; m <= this.windowS / 60; m += 2) {
      const x = left + plotW - (plotW * m * 60) / this.windowS;
      ctx.fillText(m === 0 ? "now" : `-${m}m`, x - 10, height - 5);
    }
    const xy = shown.map(([t, r]) => [left + (plotW * (t - start)) / (this.windowS * 1000),
                                            top + plotH - (plotH * r) / scale]);
    if (xy.length) {
      ctx.beginPath();
      ctx.moveTo(xy[0][0], top + plotH);
      for (const [x, y] of xy) ctx.lineTo(x, y);
      ctx.lineTo(xy[xy.length - 1][0], top + plotH);
      ctx.closePath();
      ctx.fillStyle = "rgba(37, 99, 235, 0.12)";
      ctx.fill();
      ctx.beginPath();
      xy.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.strokeStyle = "#2563eb";
      ctx.lineWidth = 2;
      ctx.stroke();
    }
    canvas.dataset.points = String(this.points.length);
    canvas.dataset.history = String(this.history.filter((p) => p[0] >= start && p[1] > 0).length);
    canvas.dataset.peak = String(peak);
  }
}

function niceCeiling(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

export function formatRate(value) {
  if (value >= 1000) return `${(value / 1000).toFixed(1)}k`;
  return value >= 10 ? value.toFixed(0) : value.toFixed(1);
}
