// Study page: the event list and the participant suggestions follow the chosen project.
(function () {
  var p = document.getElementById('project'), e = document.getElementById('event'),
      l = document.getElementById('participant-list');
  if (!p || !e) return;
  var want = e.dataset.want || '';
  function upd() {
    var o = p.options[p.selectedIndex];
    e.innerHTML = '';
    o.dataset.events.split('|').forEach(function (v) {
      var x = document.createElement('option');
      x.value = v; x.textContent = v;
      if (v === want) x.selected = true;
      e.appendChild(x);
    });
    var src = document.getElementById('participants-' + o.value);
    l.innerHTML = src ? src.innerHTML : '';
    document.getElementById('participant').title = 'must match ' + o.dataset.naming;
  }
  p.addEventListener('change', upd);
  upd();
})();
