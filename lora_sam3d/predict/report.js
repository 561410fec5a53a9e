const data = JSON.parse(document.getElementById('report-data').textContent);
const pick = document.getElementById('pick');
function bytes(b64) {
  const s = atob(b64), out = new Uint8Array(s.length);
  for (let n = 0; n < s.length; n++) out[n] = s.charCodeAt(n);
  return out.buffer;
}
function mesh(m, name, color, opacity) {
  const v = new Int32Array(bytes(m.v)), f = m.fw === 4 ? new Uint32Array(bytes(m.f)) : new Uint16Array(bytes(m.f));
  const x = [], y = [], z = [], i = [], j = [], k = [];
  for (let n = 0; n < v.length; n += 3) { x.push(v[n] / 100); y.push(v[n + 1] / 100); z.push(v[n + 2] / 100); }
  for (let n = 0; n < f.length; n += 3) { i.push(f[n]); j.push(f[n + 1]); k.push(f[n + 2]); }
  return {type: 'mesh3d', x, y, z, i, j, k, name, color, opacity, showlegend: true};
}
function show(stem) {
  const s = data.find(d => d.stem === stem) || data[0];
  if (!s) return;
  pick.value = stem;
  const traces = [];
  if (s.view.pred) traces.push(mesh(s.view.pred, 'prediction', '#d62728', s.view.truth ? 0.75 : 1.0));
  if (s.view.truth) traces.push(mesh(s.view.truth, 'truth', '#2ca02c', 0.35));
  const title = 'surface, world RAS mm' + (s.view.truth ? ' (red: predicted, green: true)' : '')
    + (s.view.pred ? '' : ' (empty prediction)');
  // plotly.js 3 reads titles as {text: ...} only (a plain string is dropped)
  Plotly.react('surface', traces, {title: {text: title, x: 0.01, xanchor: 'left'}, margin: {l: 0, r: 0, t: 60, b: 0}, height: 480,
    scene: {aspectmode: 'data', xaxis: {title: {text: 'R (mm)'}}, yaxis: {title: {text: 'A (mm)'}},
            zaxis: {title: {text: 'S (mm)'}}}},
    {responsive: true});
  document.getElementById('slice').src = s.view.slice;
  const several = s.slice_name.includes('+');
  document.getElementById('slice-title').textContent = several
    ? 'input slices ' + s.slice_name.split('+').join(', ') + ' (left to right, row by row) and their masks (red)'
    : 'input slice ' + s.slice_name + ' and its mask (red)';
  document.getElementById('metrics').textContent = s.metrics_text;
}
pick.addEventListener('change', () => { history.replaceState(null, '', '#' + pick.value); show(pick.value); });
window.addEventListener('hashchange', () => {
  show(decodeURIComponent(location.hash.slice(1)));
  document.getElementById('viewer').scrollIntoView();
});
show(decodeURIComponent(location.hash.slice(1)) || (data.length ? data[0].stem : ''));
